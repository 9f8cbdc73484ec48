"""Pass 1, face tracking: the smoothed affine matrix of the tracked face in every source frame.

Only the 2×3 matrices are kept (a few bytes a frame). Detection depends on each frame alone (mediapipe in
static-image mode), so it may run in worker processes over frame ranges (``facepool``); the choice of which face
to follow and the aligner's smoothing depend on the frames before, so they run here, in frame order.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.face import Face, FaceLandmarker, FaceTracker
from latentsync.facepool import FacePool
from latentsync.stages import StageClock, check_cancel


class _Detected:
    """A landmarker stand-in that hands the tracker faces detected elsewhere, one frame's list per call."""

    def __init__(self, faces: Iterator[list[Face]]):
        self._faces = faces

    def detect(self, _frame: Any) -> list[Face]:
        return next(self._faces)


def track_faces(video: Path, fps: float, info: video_mod.VideoInfo, limit: int | None,
                point: tuple[float, float] | None, resolution: int, *, clock: StageClock,
                pool: FacePool | None = None, landmarker: FaceLandmarker | None = None, cancel: Any = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Matrices ``(N, 2, 3)`` float32 (NaN where the face is missing) and ``has_face`` ``(N,)`` for the first
    ``limit`` frames (all when None) at ``fps``; the face followed is the largest, or the one nearest ``point``.

    With ``pool`` the detection runs in its worker processes (same results); on error or cancel the pool is
    terminated, so no worker or ffmpeg process outlives the call. Without, it runs here, on ``landmarker`` (one
    is made and closed when None).
    """
    aligner = FaceAligner(resolution)
    matrices: list[np.ndarray] = []
    has_face: list[bool] = []
    own = None
    if pool is None:
        if landmarker is None:
            with clock("faces"):
                landmarker = own = FaceLandmarker()
        frames = video_mod.read_frames(video, fps, count=limit, info=info)
        faces = (landmarker.detect(frame) for frame in frames)
    else:
        frames = None
        faces = pool.detect(video, fps, info, limit, check=lambda: check_cancel(cancel))
    tracker = FaceTracker(landmarker=_Detected(faces), point=point)
    bar = tqdm(desc="faces", unit="frame", disable=not progress, total=limit)
    try:
        while True:
            if len(matrices) % 16 == 0:
                check_cancel(cancel)
            with clock("faces"):
                try:
                    face = tracker.track(None)
                except StopIteration:
                    break
                if face is None:
                    aligner.reset()  # upstream's p_bias smoothing restarts after a gap
                    matrices.append(np.full((2, 3), np.nan, np.float32))
                    has_face.append(False)
                else:
                    matrices.append(aligner.matrix(face.anchors))
                    has_face.append(True)
            bar.update()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        faces.close()
        if frames is not None:
            frames.close()
        if own is not None:
            own.close()
    if not matrices:
        return np.zeros((0, 2, 3), np.float32), np.zeros(0, bool)
    return np.stack(matrices), np.array(has_face)
