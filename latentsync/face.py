"""Face landmarks and face tracking: which face to edit in each frame, and its three alignment anchors.

Upstream finds faces with InsightFace (non-commercial weights fetched at run time) and re-picks the largest face in
every frame, so the edit can jump between people. We use mediapipe's face mesh (Apache-2.0, models inside the wheel,
offline, CPU) and follow one face through the video (``FaceTracker``).

Detection runs mediapipe's short-range and full-range face detectors on the whole frame (the short-range model
finds close, large faces and blurry ones best; the full-range one finds faces that are small in a large frame) and
merges their boxes. Both detectors see the frame shrunk to 128 / 192 px, so in a large frame a face narrower than
about 6 % of the frame's long side (115 px in 1080p) vanishes; when this first pass finds no face in a frame
larger than ``TILE_FROM_PX``, a second pass runs the detectors on overlapping tiles a third of the long side wide,
which finds faces down to about 2 % of it (under 40 px in 1080p). Frames where the first pass finds a face are never
tiled, so their results do not change. The 468-point mesh is then fitted on a square crop around each detection,
in static-image mode, so every frame's result depends on that frame alone and is deterministic. A detection counts
only when the mesh model sees a face there (``_MIN_PRESENCE``) and the mesh has a roughly frontal face's geometry
(:func:`plausible_face`); that the face persists over neighbouring frames is pass 1's rule (``tracking``).
Every detector the pipeline uses comes from :func:`make_detector`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Anchors in the 68-point convention of upstream's 1.0/1.5 code (face_alignment): the means of points 17–21
# (eyebrow on the image's left), 22–26 (eyebrow on the image's right) and 27–35 (nose bridge and lower nose),
# written as fixed weighted means of face-mesh points. Mediapipe names sides from the subject's view, so the
# image-left eyebrow is its "right eyebrow". The weights are non-negative and sum to 1 (the anchors move rigidly
# with the face), the two eyebrows use mirror-image points with equal weights, and they were fitted once by least
# squares against dlib's 68-point predictor on astronaut() and the 100 faces of lfw_subset() (×8 upscaled), in
# units of the inter-ocular distance: ``benchmarks/fit_face_anchors.py``. Resulting mean offset from dlib's
# anchors over the 91 faces both find: 0.83 / 0.72 / 0.79 % of the IOD (per-face scatter 4–5 %).
#
#   anchor                 mesh point (weight)       where it is
#   eyebrow, image left    70 (0.10), 46 (0.13)      outer end of the eyebrow, upper and lower edge
#                          63 (0.20)                 upper edge, outer third
#                          65 (0.45)                 lower edge, inner third
#                          107 (0.12)                inner end, upper edge
#                          -> dlib's 17-21 run along the eyebrow between its upper and lower edge, so the
#                             fit mixes points of both edges (weights as the fit chose them, rounded)
#   eyebrow, image right   300, 276, 293, 295, 336   mirror images of 70, 46, 63, 65, 107, same weights
#   nose centre            168 (0.20)                between the eyes, top of the bridge (dlib 27)
#                          1 (0.44)                  nose tip (dlib 30; dlib's 28-29 lie between 27 and 30)
#                          98, 327 (0.18 each)       beside the nostril wings (dlib 31 and 35; 32-34 between)
ANCHOR_WEIGHTS: tuple[tuple[tuple[int, float], ...], ...] = (
    ((70, 0.10), (63, 0.20), (107, 0.12), (46, 0.13), (65, 0.45)),
    ((300, 0.10), (293, 0.20), (336, 0.12), (276, 0.13), (295, 0.45)),
    ((168, 0.20), (1, 0.44), (98, 0.18), (327, 0.18)),
)

_CROP_SCALE = 2.5  # square mesh crop side, in detection-box sizes: the whole head plus context for the mesh's detector
_MERGE_IOU = 0.3  # detections of the two detectors overlapping more than this are one face

# The tiled second pass, measured on skimage's astronaut pasted into grey frames (face width = mesh extent): the
# whole 1080p frame finds it from ~110 px, tiles of a third of the long side (8 tiles for 16:9, ~90 ms a frame
# on one CPU core) from 24 px (4K: from 52 px); LFW's 25-px faces, upscaled, are found from 48–100 px.
TILE_FROM_PX = 640  # frames with a longer side get the tiled pass; smaller ones lose nothing to the detectors' input
_TILES_PER_SIDE = 3  # tile side = long side / 3: a face is shrunk 3 times less than in the first pass
_TILE_OVERLAP = 0.25  # of a tile: any face narrower than this (all the first pass misses) lies whole in one tile
_FOUND_FRACTION = (0.05, 0.02)  # narrowest face found, as a fraction of the long side: whole frame, tiled
# The mesh model's own face-presence score, which mediapipe 0.10.21 thresholds by ``min_tracking_confidence`` in
# static-image mode too. The detectors' scores do not tell scenery from faces (a nose-cone logo in rocket() scores
# 0.6–0.8 in the tiles, real 30–60 px faces 0.6–0.9); this does: the logo's crops fail a bar of 0.9, the faces
# of astronaut() (full size and 30–60 px in 1080p) and of lfw_subset() pass even 0.9999.
_MIN_PRESENCE = 0.9

# A plausible face, read off the mesh (mediapipe indices): the eye centres (33+133, 362+263), forehead top 10, chin
# 152, nose tip 1, mouth corners 61 and 291. ``_MIN_EYE_SPAN``: inter-ocular distance over forehead-to-chin length,
# which turning the head shrinks (roll does not change it): astronaut() gives 0.41, the 91 faces of lfw_subset()
# meshed 0.32–0.47 (1 % below 0.36), the cameraman's near profile in camera() 0.23–0.25. LatentSync needs a roughly
# frontal face.
_MIN_EYE_SPAN = 0.30
_EYES, _TOP, _CHIN, _NOSE, _MOUTH = ((33, 133), (362, 263)), 10, 152, 1, (61, 291)


# What mediapipe and TFLite print from C++ straight to file descriptor 2 when their graphs start (no setting or
# variable turns it off): TFLite's delegate notice, absl's pre-initialisation notice, and absl-formatted I/W lines.
_NATIVE_CHATTER = re.compile(r"INFO: Created TensorFlow Lite|WARNING: All log messages before absl::InitializeLog"
                             r"|[IW]\d{4} [\d:.]+ +\d+ \S+\.cc:\d+\] ")
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _native_chatter_dropped():
    """File descriptor 2 goes to a temporary file meanwhile; what landed there is written back to stderr except
    mediapipe's start-up chatter, so no other output is lost."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not _NATIVE_CHATTER.match(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@dataclass(frozen=True, eq=False)
class Face:
    """One face in one frame: mesh-extent ``box`` (x1, y1, x2, y2) in pixels, detector ``score``, the (3, 2)
    ``anchors`` (eyebrow centre on the image's left, on the image's right, nose centre) and all mesh points
    ``landmarks`` (468, 2), pixel-centre coordinates (x, y)."""

    box: tuple[float, float, float, float]
    score: float
    anchors: np.ndarray
    landmarks: np.ndarray

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def area(self) -> float:
        return max(self.box[2] - self.box[0], 0.0) * max(self.box[3] - self.box[1], 0.0)


def anchors_from_mesh(landmarks: np.ndarray) -> np.ndarray:
    """The three (3, 2) alignment anchors as the fixed weighted means ``ANCHOR_WEIGHTS`` of mesh points."""
    out = np.empty((3, 2), dtype=np.float64)
    for k, terms in enumerate(ANCHOR_WEIGHTS):
        idx = [i for i, _ in terms]
        w = np.array([w for _, w in terms], dtype=np.float64)
        out[k] = w @ landmarks[idx] / w.sum()
    return out


def eye_span(landmarks: np.ndarray) -> float:
    """Inter-ocular distance over the forehead-to-chin length of a (468, 2) mesh: about 0.4 for a frontal face,
    less the more the head is turned away."""
    left, right = (landmarks[list(eye)].mean(0) for eye in _EYES)
    length = float(np.hypot(*(landmarks[_CHIN] - landmarks[_TOP])))
    return float(np.hypot(*(right - left))) / length if length > 0 else 0.0


def plausible_face(landmarks: np.ndarray) -> bool:
    """Whether a mesh has a roughly frontal face's geometry: eyes far enough apart (``_MIN_EYE_SPAN``), and along
    the face's axis (forehead to chin) eyes, nose tip, mouth and chin in that order."""
    if not np.isfinite(landmarks).all() or eye_span(landmarks) < _MIN_EYE_SPAN:
        return False
    top, chin = landmarks[_TOP], landmarks[_CHIN]
    axis = (chin - top) / np.hypot(*(chin - top))
    eyes = float((landmarks[[i for eye in _EYES for i in eye]].mean(0) - top) @ axis)
    nose = float((landmarks[_NOSE] - top) @ axis)
    mouth = float((landmarks[list(_MOUTH)].mean(0) - top) @ axis)
    return 0 < eyes < nose < mouth < float((chin - top) @ axis)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class FaceLandmarker:
    """Finds up to ``max_faces`` faces per RGB frame with mediapipe and returns their anchors.

    Not thread-safe (mediapipe graphs are stateful): use one instance per thread. ``close()`` frees the graphs.
    """

    def __init__(self, max_faces: int = 4, min_confidence: float = 0.5):
        from mediapipe.python.solutions.face_detection import FaceDetection
        from mediapipe.python.solutions.face_mesh import FaceMesh

        self.max_faces = int(max_faces)
        self.min_confidence = float(min_confidence)
        self._starting = True  # until the mesh has run once: its first runs still print start-up chatter
        with _native_chatter_dropped():
            self._detectors = [
                FaceDetection(model_selection=0, min_detection_confidence=self.min_confidence),
                FaceDetection(model_selection=1, min_detection_confidence=self.min_confidence),
            ]
            # Static-image mode: no state between calls, so results do not depend on frame order.
            self._mesh = FaceMesh(static_image_mode=True, max_num_faces=2, refine_landmarks=False,
                                  min_detection_confidence=self.min_confidence,
                                  min_tracking_confidence=max(self.min_confidence, _MIN_PRESENCE))
            # A graph opens its calculators (and they print) in its own threads after it starts; one run on a
            # blank image waits for that. Every graph is stateless between images, so results do not change.
            blank = np.zeros((64, 64, 3), dtype=np.uint8)
            for graph in (*self._detectors, self._mesh):
                graph.process(blank)

    def close(self) -> None:
        for graph in (*self._detectors, self._mesh):
            graph.close()

    def __enter__(self) -> FaceLandmarker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def detect(self, frame_rgb: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB frame, largest first; an empty list when there are none."""
        frame = np.ascontiguousarray(frame_rgb)
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB frame, got {frame.shape} {frame.dtype}")
        if self._starting:
            with _native_chatter_dropped():
                return self._detect(frame)
        return self._detect(frame)

    def _detect(self, frame: np.ndarray) -> list[Face]:
        faces = self._faces(frame, self._detections(frame))
        if not faces and max(frame.shape[:2]) > TILE_FROM_PX:
            faces = self._faces(frame, self._tiled_detections(frame))
        return faces

    def _faces(self, frame: np.ndarray,
               detections: list[tuple[tuple[float, float, float, float], float]]) -> list[Face]:
        """The meshed faces of ``detections``, largest first (a detection the mesh does not confirm is dropped)."""
        faces: list[Face] = []
        for box, score in detections:
            landmarks = self._mesh_in_box(frame, box)
            if landmarks is None:
                log.debug("no face mesh for the detection at %s (score %.2f); skipped", box, score)
                continue
            if not plausible_face(landmarks):
                log.debug("the mesh at %s (score %.2f) is no frontal face; skipped", box, score)
                continue
            x1, y1 = landmarks.min(0)
            x2, y2 = landmarks.max(0)
            box = (float(x1), float(y1), float(x2), float(y2))
            if any(box_iou(box, f.box) > 0.5 for f in faces):  # two detections that meshed to one face
                continue
            landmarks.setflags(write=False)
            anchors = anchors_from_mesh(landmarks)
            anchors.setflags(write=False)
            faces.append(Face(box, score, anchors, landmarks))
        faces.sort(key=lambda f: -f.area)
        return faces

    def _detections(self, frame: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes (pixels) and scores of both detectors on the whole frame, merged, best score first."""
        return self._merged(self._raw_detections(frame))

    def _tiled_detections(self, frame: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        """Boxes and scores of both detectors on overlapping tiles (faces too small for the whole frame), merged."""
        found = []
        for x0, y0, x1, y1 in frame_tiles(*frame.shape[:2]):
            tile = np.ascontiguousarray(frame[y0:y1, x0:x1])
            for (bx1, by1, bx2, by2), score in self._raw_detections(tile):
                found.append(((bx1 + x0, by1 + y0, bx2 + x0, by2 + y0), score))
        return self._merged(found)

    def _raw_detections(self, image: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
        h, w = image.shape[:2]
        found = []
        for detector in self._detectors:
            for det in detector.process(image).detections or []:
                rb = det.location_data.relative_bounding_box
                box = (rb.xmin * w, rb.ymin * h, (rb.xmin + rb.width) * w, (rb.ymin + rb.height) * h)
                found.append((box, float(det.score[0])))
        return found

    def _merged(self, found: list[tuple[tuple[float, float, float, float], float]]
                ) -> list[tuple[tuple[float, float, float, float], float]]:
        """One box per face (the best-scored of those overlapping), best score first, at most ``max_faces``."""
        found = sorted(found, key=lambda d: -d[1])
        kept: list[tuple[tuple[float, float, float, float], float]] = []
        for box, score in found:
            if all(box_iou(box, k[0]) <= _MERGE_IOU for k in kept):
                kept.append((box, score))
        return kept[: self.max_faces]

    def _mesh_in_box(self, frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """Mesh points (468, 2) of the face in ``box``, fitted on a square crop around it; None if the mesh fails."""
        h, w = frame.shape[:2]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        side = max(int(math.ceil(_CROP_SCALE * max(box[2] - box[0], box[3] - box[1]))), 16)
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        crop = np.zeros((side, side, 3), dtype=np.uint8)  # black beyond the frame's edges
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if sx0 >= sx1 or sy0 >= sy1:
            return None
        crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = frame[sy0:sy1, sx0:sx1]
        result = self._mesh.process(crop).multi_face_landmarks
        self._starting = False
        if not result:
            return None
        best, best_dist = None, math.inf
        for mesh in result:
            # mediapipe's normalised coordinates span the image's edges; -0.5 gives pixel-centre coordinates.
            pts = np.array([(p.x * side - 0.5, p.y * side - 0.5) for p in mesh.landmark], dtype=np.float64)
            dist = float(np.hypot(*(pts.mean(0) - side / 2)))
            if dist < best_dist:
                best, best_dist = pts, dist
        if best_dist > side / 4:  # the mesh found a neighbour, not the detected face
            return None
        assert best is not None  # best_dist is finite only once a mesh was kept
        return best + (x0, y0)


def make_detector(max_faces: int = 4, min_confidence: float = 0.5) -> FaceLandmarker:
    """A new face detector, the one place that names its class: to swap detectors, return here any object with
    ``detect(frame_rgb) -> list[Face]`` (largest first), ``close()`` and the context-manager methods."""
    return FaceLandmarker(max_faces=max_faces, min_confidence=min_confidence)


def frame_tiles(height: int, width: int) -> list[tuple[int, int, int, int]]:
    """The second pass's tiles (x0, y0, x1, y1): squares a third of the long side, overlapping by a quarter."""
    side = math.ceil(max(height, width) / _TILES_PER_SIDE)

    def starts(length: int) -> list[int]:
        if length <= side:
            return [0]
        n = math.ceil((length - side) / (side * (1 - _TILE_OVERLAP))) + 1
        return [round(i * (length - side) / (n - 1)) for i in range(n)]

    return [(x, y, min(x + side, width), min(y + side, height)) for y in starts(height) for x in starts(width)]


def smallest_face_px(height: int, width: int) -> int:
    """About the narrowest face (pixels) :class:`FaceLandmarker` finds in a frame of this size; for error messages."""
    long_side = max(height, width)
    fraction = _FOUND_FRACTION[1] if long_side > TILE_FROM_PX else _FOUND_FRACTION[0]
    return max(math.ceil(fraction * long_side), 24)


def no_face_message(name: str, height: int, width: int) -> str:
    """The one-line reason for a video in which no frame has a face, naming the smallest face size we find."""
    return (f"{name}: no face was found in any frame; LatentSync needs a visible, roughly frontal face, at least "
            f"about {smallest_face_px(height, width)} px wide in this {width}x{height} video")


class FaceTracker:
    """Follows one face through a video, so the edit never jumps to another person.

    The first frame with faces picks the target: the largest face, or with ``point=(x, y)`` the face nearest to
    that point. Later frames take the face that overlaps / lies nearest to the target's last box; a frame without
    it gives None (never an exception), and after a gap the same face is picked up again by proximity to where it
    was last seen — another person farther away is ignored.

    With ``repick_after``, a face that cannot be followed once the target has been unseen for that many frames is
    picked afresh (largest, or nearest ``point``): after a cut that moves or resizes the face, it is edited again.
    The choice then depends on the last ``repick_after`` + 1 frames only, whatever came before, when each of them
    shows at most one face (``tracking.forgotten_from`` relies on it).

    Anchors are returned raw: the only temporal smoothing is the aligner's (upstream's p_bias rule). Contract with
    the pipeline: whenever ``track`` returns None between frames with a face, call ``FaceAligner.reset()`` before
    aligning the next face, exactly as after ``FaceTracker.reset()``.
    """

    def __init__(self, landmarker: FaceLandmarker | None = None, point: tuple[float, float] | None = None,
                 max_step: float = 0.5, repick_after: int | None = None):
        self.landmarker = landmarker if landmarker is not None else make_detector()
        self.point = None if point is None else (float(point[0]), float(point[1]))
        self.max_step = max_step  # largest centre move per frame, in face sizes
        self.repick_after = repick_after
        self._last: Face | None = None
        self._gap = 0

    @property
    def gap(self) -> int:
        """Frames since the tracked face was last seen (0 when it is in the last frame)."""
        return self._gap

    def reset(self) -> None:
        """Forget the target; the next frame with faces picks one again (largest, or nearest to ``point``)."""
        self._last = None
        self._gap = 0

    def track(self, frame_rgb: np.ndarray) -> Face | None:
        """The tracked face in this frame, or None when it is not visible."""
        faces = self.landmarker.detect(frame_rgb)
        face = self._pick_first(faces) if self._last is None else self._follow(faces)
        if face is None and self.repick_after is not None and self._gap >= self.repick_after:
            face = self._pick_first(faces)
        if face is None:
            self._gap += 1
            return None
        self._last, self._gap = face, 0
        return face

    def _pick_first(self, faces: list[Face]) -> Face | None:
        if not faces:
            return None
        if self.point is None:
            return max(faces, key=lambda f: f.area)
        px, py = self.point

        def distance(f: Face) -> tuple[float, float]:
            dx = max(f.box[0] - px, 0.0, px - f.box[2])
            dy = max(f.box[1] - py, 0.0, py - f.box[3])
            return (math.hypot(dx, dy), math.hypot(f.center[0] - px, f.center[1] - py))

        return min(faces, key=distance)

    def _follow(self, faces: list[Face]) -> Face | None:
        last = self._last
        assert last is not None  # track() follows only once a face was picked
        size = math.sqrt(max(last.area, 1.0))
        # The face may have moved farther the longer it was unseen, up to two face sizes.
        reach = min(self.max_step * (1 + self._gap), 2.0) * size
        best, best_key = None, None
        for f in faces:
            dist = math.hypot(f.center[0] - last.center[0], f.center[1] - last.center[1])
            ratio = math.sqrt(max(f.area, 1.0)) / size
            if dist > reach or not 0.5 <= ratio <= 2.0:
                continue
            key = (-box_iou(f.box, last.box), dist)
            if best_key is None or key < best_key:
                best, best_key = f, key
        return best
