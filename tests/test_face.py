"""Face landmarks and tracking on real faces (skimage's astronaut and LFW faces)."""
from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from latentsync.face import (
    ANCHOR_WEIGHTS,
    Face,
    FaceLandmarker,
    FaceTracker,
    anchors_from_mesh,
    eye_span,
    plausible_face,
)

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def landmarker():
    with FaceLandmarker(max_faces=4) as lm:
        yield lm


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


def lfw_face(index: int, scale: float) -> np.ndarray:
    """An LFW face (25×25 grey) upscaled with Lanczos, as RGB uint8."""
    grey = np.clip(np.round(skimage_data.lfw_subset()[index] * 255), 0, 255).astype(np.uint8)
    up = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_LANCZOS4)
    return np.ascontiguousarray(np.repeat(up[..., None], 3, axis=2))


def paste(canvas: np.ndarray, image: np.ndarray, cx: float, cy: float) -> tuple[int, int, int, int]:
    h, w = image.shape[:2]
    x, y = int(cx - w / 2), int(cy - h / 2)
    canvas[y:y + h, x:x + w] = image
    return x, y, x + w, y + h


def inside(face: Face, region: tuple[int, int, int, int]) -> bool:
    cx, cy = face.center
    return region[0] <= cx < region[2] and region[1] <= cy < region[3]


def two_people(t: int, astronaut: np.ndarray, covered: bool = False):
    """Frame t of a clip with the astronaut (left, shrinking) and an LFW face (right, growing): the larger face
    changes from the astronaut to the other person at t = 2. Returns the frame and both paste regions."""
    canvas = np.full((600, 1100, 3), 110, np.uint8)
    s = 1.6 - 0.08 * t
    head = cv2.resize(astronaut[20:320, 110:350], None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    region_a = paste(canvas, head, 300 + 12 * t, 300)
    region_b = paste(canvas, lfw_face(3, 6 + 0.6 * t), 820 - 12 * t, 300)
    if covered:  # a grey card over the astronaut's face
        x0, y0, x1, y1 = region_a
        canvas[y0:(y0 + y1) // 2 + 20, x0:x1] = 90
    return canvas, region_a, region_b


def jitter(image: np.ndarray, dx: float, dy: float, angle: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), m


def test_anchor_weights_are_affine_combinations():
    for terms in ANCHOR_WEIGHTS:
        weights = [w for _, w in terms]
        assert all(w > 0 for w in weights)
        assert sum(weights) == pytest.approx(1.0, abs=1e-9)
    mesh = np.random.default_rng(0).normal(size=(468, 2))
    shifted = anchors_from_mesh(mesh + (3.0, -2.0))
    np.testing.assert_allclose(shifted, anchors_from_mesh(mesh) + (3.0, -2.0), atol=1e-12)


def test_astronaut_anchors_in_upstream_order(landmarker, astronaut):
    faces = landmarker.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    left, right, nose = face.anchors
    assert left[0] < nose[0] < right[0]  # eyebrow on the image's left first
    assert nose[1] > max(left[1], right[1])  # the nose centre lies below the eyebrows
    x1, y1, x2, y2 = face.box
    assert x1 < left[0] and right[0] < x2 and y1 < left[1] and nose[1] < y2
    assert 0.5 <= face.score <= 1.0
    assert face.landmarks.shape == (468, 2)


def test_detection_is_deterministic(landmarker, astronaut):
    a = landmarker.detect(astronaut)[0]
    b = landmarker.detect(astronaut.copy())[0]
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert a.score == b.score


def test_astronaut_found_in_every_jittered_frame(landmarker, astronaut):
    rng = np.random.default_rng(7)
    base = landmarker.detect(astronaut)[0].anchors
    iod = np.linalg.norm(base[1] - base[0])
    for _ in range(12):
        frame, m = jitter(astronaut, *rng.uniform(-12, 12, 2), rng.uniform(-8, 8), rng.uniform(0.9, 1.1))
        faces = landmarker.detect(frame)
        assert len(faces) == 1
        expected = base @ m[:, :2].T + m[:, 2]
        # The anchors follow the face: within 3 % of the eyebrow distance of where the warp put them.
        assert np.abs(faces[0].anchors - expected).max() < 0.03 * iod


def test_black_frame_and_covered_face_have_no_face(landmarker, astronaut):
    assert landmarker.detect(np.zeros((480, 640, 3), np.uint8)) == []
    covered = astronaut.copy()
    covered[40:220, 150:310] = 128
    assert landmarker.detect(covered) == []
    tracker = FaceTracker(landmarker)
    assert tracker.track(np.zeros((480, 640, 3), np.uint8)) is None
    assert tracker.track(covered) is None
    assert tracker.track(astronaut) is not None  # the first visible face is picked up after empty frames


def test_tracker_follows_the_first_face_although_another_grows_larger(landmarker, astronaut):
    tracker = FaceTracker(landmarker)
    for t in range(8):
        frame, region_a, region_b = two_people(t, astronaut)
        faces = landmarker.detect(frame)
        assert len(faces) == 2, f"frame {t}: both people must be visible"
        face = tracker.track(frame)
        assert face is not None and inside(face, region_a), f"frame {t}: tracker left the astronaut"
    assert inside(faces[0], region_b)  # by then the other person is the larger face (upstream's choice)


def test_point_selects_the_other_person(landmarker, astronaut):
    _, _, region_b = two_people(0, astronaut)
    tracker = FaceTracker(landmarker, point=((region_b[0] + region_b[2]) / 2, region_b[1] + 5))
    for t in range(8):
        frame, _, region_b = two_people(t, astronaut)
        face = tracker.track(frame)
        assert face is not None and inside(face, region_b), f"frame {t}: tracker left the chosen person"


def test_gap_gives_none_and_reacquires_the_same_face(landmarker, astronaut):
    tracker = FaceTracker(landmarker)
    covered_frames = {3, 4}
    for t in range(7):
        frame, region_a, region_b = two_people(t, astronaut, covered=t in covered_frames)
        face = tracker.track(frame)
        if t in covered_frames:
            assert landmarker.detect(frame), "the other person stays visible during the gap"
            assert face is None and tracker.gap > 0
        else:
            assert face is not None and inside(face, region_a) and tracker.gap == 0


def test_reset_picks_again(landmarker, astronaut):
    tracker = FaceTracker(landmarker)
    for t in range(8):
        later, region_a, region_b = two_people(t, astronaut)
        assert inside(tracker.track(later), region_a)
    tracker.reset()
    assert inside(tracker.track(later), region_b)  # now the largest face


def dlib_anchors(image: np.ndarray, detector, predictor) -> tuple[np.ndarray, float] | None:
    rects = detector(image, 1)
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.width() * r.height())
    pts = np.array([(p.x, p.y) for p in predictor(image, rect).parts()], dtype=np.float64)
    anchors = np.stack([pts[17:22].mean(0), pts[22:27].mean(0), pts[27:36].mean(0)])
    return anchors, float(np.linalg.norm(pts[42:48].mean(0) - pts[36:42].mean(0)))


@pytest.mark.slow
def test_anchor_offsets_against_dlib_68_points(landmarker, astronaut):
    dlib = pytest.importorskip("dlib")
    models = pytest.importorskip("face_recognition_models")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(models.pose_predictor_model_location())
    images = [astronaut]
    for i in range(100):  # the first 100 of lfw_subset() are faces
        up = cv2.copyMakeBorder(lfw_face(i, 8), 50, 50, 50, 50, cv2.BORDER_REPLICATE)
        images.append(np.ascontiguousarray(up))
    offsets = []
    for image in images:
        ref = dlib_anchors(image, detector, predictor)
        faces = landmarker.detect(image)
        if ref is None or not faces:
            continue
        offsets.append((faces[0].anchors - ref[0]) / ref[1])
    assert len(offsets) >= 85, "both methods should find most of these faces"
    mean_offset = np.linalg.norm(np.mean(offsets, axis=0), axis=-1)
    assert (mean_offset < 0.015).all(), f"mean anchor offsets {mean_offset * 100} % IOD"


def astronaut_in_1080p(astronaut: np.ndarray, width_px: float, landmarker: FaceLandmarker) -> np.ndarray:
    """The whole astronaut picture scaled so her face is ``width_px`` wide, pasted into a grey 1920×1080 frame."""
    face = landmarker.detect(astronaut)[0]
    s = width_px / (face.box[2] - face.box[0])
    picture = cv2.resize(astronaut, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    frame = np.full((1080, 1920, 3), 110, np.uint8)
    h, w = picture.shape[:2]
    frame[1080 - h:, 1900 - w:1900] = picture  # lower right: the face is not centred in any tile
    return frame


def test_small_face_in_1080p_is_found_by_the_tiled_pass(landmarker, astronaut):
    frame = astronaut_in_1080p(astronaut, 50, landmarker)
    assert landmarker._faces(frame, landmarker._detections(frame)) == [], "the whole-frame pass alone finds it now"
    faces = landmarker.detect(frame)
    assert len(faces) == 1
    width = faces[0].box[2] - faces[0].box[0]
    assert 42 <= width <= 58
    left, right, nose = faces[0].anchors
    assert left[0] < nose[0] < right[0] and nose[1] > max(left[1], right[1])


def test_a_face_the_first_pass_finds_is_not_tiled(landmarker, astronaut, monkeypatch):
    frame = astronaut_in_1080p(astronaut, 150, landmarker)
    before = landmarker.detect(frame)

    def no_tiles(_frame):
        raise AssertionError("the tiled pass ran although the first pass found a face")

    monkeypatch.setattr(landmarker, "_tiled_detections", no_tiles)
    after = landmarker.detect(frame)
    assert len(before) == len(after) == 1
    np.testing.assert_array_equal(before[0].landmarks, after[0].landmarks)


def test_tiles_cover_the_frame_with_overlap():
    from latentsync.face import frame_tiles

    tiles = frame_tiles(1080, 1920)
    assert len(tiles) == 8 and all(x1 - x0 == 640 and y1 - y0 == 640 for x0, y0, x1, y1 in tiles)
    covered = np.zeros((1080, 1920), int)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    # Neighbours overlap by at least a quarter tile, so any face the first pass misses lies whole in one tile.
    xs = sorted({x0 for x0, _, _, _ in tiles})
    assert all(640 - (b - a) >= 160 for a, b in itertools.pairwise(xs))


def test_no_face_message_names_the_smallest_face_we_find(landmarker):
    from latentsync.face import no_face_message, smallest_face_px

    assert smallest_face_px(1080, 1920) <= 48 < smallest_face_px(2160, 3840)
    message = no_face_message("clip.mp4", 1080, 1920)
    assert "no face" in message and f"{smallest_face_px(1080, 1920)} px" in message and "1920x1080" in message
    assert len(message.splitlines()) == 1


def frame_1080p(image: np.ndarray, dx: int = 0) -> np.ndarray:
    """``image`` scaled to 1080 px high, centred (shifted by ``dx``) in a grey 1920×1080 frame."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    w = round(image.shape[1] * 1080 / image.shape[0])
    frame = np.full((1080, 1920, 3), 100, np.uint8)
    x = (1920 - w) // 2 + dx
    frame[:, x:x + w] = cv2.resize(image, (w, 1080), interpolation=cv2.INTER_AREA)
    return frame


def test_a_frontal_mesh_is_a_plausible_face_and_a_turned_or_scrambled_one_is_not(landmarker, astronaut):
    mesh = landmarker.detect(astronaut)[0].landmarks
    assert plausible_face(mesh) and 0.36 < eye_span(mesh) < 0.46
    centre = mesh.mean(0)
    turned = (mesh - centre) * (0.6, 1.0) + centre  # the head turned about 50° away: the eyes close up
    assert not plausible_face(turned)
    upside_down = mesh.copy()
    upside_down[[1, 61, 291]] = mesh[[10, 10, 10]]  # nose and mouth above the eyes
    assert not plausible_face(upside_down)


def test_the_cameramans_profile_is_no_face(landmarker):
    frame = frame_1080p(skimage_data.camera())
    raw = [landmarker._mesh_in_box(frame, box) for box, _ in landmarker._detections(frame)]
    assert any(m is not None for m in raw), "the detector no longer fires on the profile: the test tests nothing"
    assert landmarker.detect(frame) == []
