"""One-off fit of ``latentsync.face.ANCHOR_WEIGHTS`` against dlib's 68-point predictor on real faces.

For each anchor (68-point means of 17–21, 22–26, 27–35) it finds non-negative weights summing to 1 over a few
candidate face-mesh points that best reproduce dlib's anchor, in units of the inter-ocular distance (IOD, between
dlib's eye centres), on skimage's astronaut() and the 100 faces of lfw_subset() (25×25 grey, upscaled ×8).
Then it prints the offsets of the weights currently in face.py. Needs the test extras (dlib-bin,
face-recognition-models, scikit-image):

    .venv/bin/python benchmarks/fit_face_anchors.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentsync.face import ANCHOR_WEIGHTS, FaceLandmarker, anchors_from_mesh  # noqa: E402

# Candidate mesh points, as (image-left point, its mirror image) pairs so the fit stays left/right symmetric:
# mediapipe's eyebrow contours (upper and lower edge), and its nose region (midline points pair with themselves).
EYEBROW_PAIRS = ((70, 300), (63, 293), (105, 334), (66, 296), (107, 336),
                 (46, 276), (53, 283), (52, 282), (65, 295), (55, 285))
NOSE_PAIRS = ((168, 168), (6, 6), (197, 197), (195, 195), (5, 5), (4, 4), (1, 1), (19, 19), (94, 94), (2, 2),
              (98, 327), (97, 326), (64, 294), (48, 278), (115, 344), (220, 440), (45, 275))
DLIB_GROUPS = (range(17, 22), range(22, 27), range(27, 36))


def real_faces() -> list[tuple[str, np.ndarray]]:
    """astronaut() and the 100 LFW faces as RGB uint8 images (LFW: ×8 Lanczos upscale, replicated border)."""
    import cv2
    from skimage import data

    images = [("astronaut", data.astronaut())]
    lfw = data.lfw_subset()[:100]  # the first 100 are faces, the rest non-faces
    for i, grey in enumerate(lfw):
        g8 = np.clip(np.round(grey * 255), 0, 255).astype(np.uint8)
        up = cv2.resize(g8, (g8.shape[1] * 8, g8.shape[0] * 8), interpolation=cv2.INTER_LANCZOS4)
        up = cv2.copyMakeBorder(up, 50, 50, 50, 50, cv2.BORDER_REPLICATE)
        images.append((f"lfw{i:03d}", np.ascontiguousarray(np.stack([up] * 3, axis=-1))))
    return images


def dlib_points(image: np.ndarray) -> np.ndarray | None:
    """dlib's 68 points (x, y) of the largest face dlib's own detector finds, or None."""
    import dlib
    import face_recognition_models

    global _DLIB
    if "_DLIB" not in globals():
        _DLIB = (dlib.get_frontal_face_detector(),
                 dlib.shape_predictor(face_recognition_models.pose_predictor_model_location()))
    detector, predictor = _DLIB
    rects = detector(image, 1)
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.width() * r.height())
    shape = predictor(image, rect)
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def collect() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Names, mesh points (n, 468, 2), dlib anchors (n, 3, 2) and IOD (n,) of faces both methods find."""
    names, meshes, targets, iods = [], [], [], []
    with FaceLandmarker(max_faces=1) as landmarker:
        for name, image in real_faces():
            pts68 = dlib_points(image)
            faces = landmarker.detect(image)
            if pts68 is None or not faces:
                print(f"skip {name}: dlib {'ok' if pts68 is not None else 'none'}, mesh {len(faces)}")
                continue
            names.append(name)
            meshes.append(faces[0].landmarks)
            targets.append([pts68[list(g)].mean(0) for g in DLIB_GROUPS])
            iods.append(np.linalg.norm(pts68[42:48].mean(0) - pts68[36:42].mean(0)))
    return names, np.array(meshes), np.array(targets), np.array(iods)


def fit(meshes: np.ndarray, targets: np.ndarray, iods: np.ndarray, pairs, anchors: tuple[int, ...]
        ) -> dict[tuple[int, int], float]:
    """Non-negative weights summing to 1 over candidate ``pairs`` minimising the IOD-normalised anchor error.

    With two anchors (the eyebrows) the first uses each pair's first point and the second its mirror, with the
    same weight; with one (the nose) a pair stands for the midpoint of its two points.
    """
    from scipy.optimize import nnls

    rows, rhs = [], []
    for slot, k in enumerate(anchors):
        if len(anchors) == 2:
            pts = meshes[:, [p[slot] for p in pairs]]
        else:
            pts = (meshes[:, [p[0] for p in pairs]] + meshes[:, [p[1] for p in pairs]]) / 2
        pts = pts / iods[:, None, None]  # (n, c, 2)
        for axis in (0, 1):
            rows.append(pts[:, :, axis])
            rhs.append(targets[:, k, axis] / iods)
    big = 1e3  # the sum-to-one constraint as a heavily weighted extra equation
    a = np.vstack(rows + [big * np.ones((1, len(pairs)))])
    w, _ = nnls(a, np.append(np.concatenate(rhs), big))
    return {p: float(x) for p, x in zip(pairs, w, strict=True) if x > 0.03}


def offsets(meshes: np.ndarray, targets: np.ndarray, iods: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor: |mean offset vector| and mean |offset|, in % of the IOD."""
    ours = np.array([anchors_from_mesh(m) for m in meshes])
    rel = (ours - targets) / iods[:, None, None] * 100
    return np.linalg.norm(rel.mean(0), axis=-1), np.linalg.norm(rel, axis=-1).mean(0)


def main() -> None:
    names, meshes, targets, iods = collect()
    print(f"{len(names)} faces found by both (astronaut: {'astronaut' in names}); IOD median {np.median(iods):.1f} px")
    for label, pairs, anchors in (("eyebrows", EYEBROW_PAIRS, (0, 1)), ("nose", NOSE_PAIRS, (2,))):
        w = fit(meshes, targets, iods, pairs, anchors)
        w = fit(meshes, targets, iods, tuple(w), anchors)  # refit on the points that survived
        total = sum(w.values())
        print(f"{label}: " + ", ".join(f"({p[0]}/{p[1]}, {x / total:.3f})" for p, x in w.items()))
        # Held-out check: fit on every other face, measure the mean offset on the rest.
        for train, test in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
            wt = fit(meshes[train], targets[train], iods[train], tuple(w), anchors)
            for slot, k in enumerate(anchors):
                pts = np.array([p[slot] if len(anchors) == 2 else p[0] for p in wt])
                mirror = np.array([p[slot] if len(anchors) == 2 else p[1] for p in wt])
                ws = np.array(list(wt.values())) / sum(wt.values())
                est = np.einsum("c,ncd->nd", ws, (meshes[test][:, pts] + meshes[test][:, mirror]) / 2)
                rel = (est - targets[test][:, k]) / iods[test][:, None] * 100
                print(f"  held-out anchor {k}: |mean offset| {np.linalg.norm(rel.mean(0)):.2f} % IOD")
    print("weights in face.py:", ANCHOR_WEIGHTS)
    astro = [i for i, n in enumerate(names) if n == "astronaut"]
    lfw = [i for i, n in enumerate(names) if n != "astronaut"]
    for label, idx in (("astronaut", astro), ("lfw", lfw), ("all", list(range(len(names))))):
        if not idx:
            continue
        bias, dist = offsets(meshes[idx], targets[idx], iods[idx])
        print(f"{label:9s} |mean offset| % IOD: " + " ".join(f"{x:5.2f}" for x in bias)
              + "   mean |offset| % IOD: " + " ".join(f"{x:5.2f}" for x in dist))


if __name__ == "__main__":
    main()
