"""Pass 1, face tracking: the smoothed affine matrix of the tracked face in every source frame.

Only the 2×3 matrices are kept (a few bytes a frame). Detection depends on each frame alone (mediapipe in
static-image mode), so it may run in worker processes over frame ranges; the choice of which face to follow and
the aligner's smoothing depend on the frames before, so they run here, in frame order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.face import FaceTracker
from latentsync.stages import StageClock, check_cancel


def track_faces(video: Path, fps: float, info: video_mod.VideoInfo, limit: int | None,
                point: tuple[float, float] | None, resolution: int, *, clock: StageClock, cancel: Any = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Matrices ``(N, 2, 3)`` float32 (NaN where the face is missing) and ``has_face`` ``(N,)`` for the first
    ``limit`` frames (all when None) at ``fps``; the face followed is the largest, or the one nearest ``point``."""
    tracker = FaceTracker(point=point)
    aligner = FaceAligner(resolution)
    matrices: list[np.ndarray] = []
    has_face: list[bool] = []
    frames = video_mod.read_frames(video, fps, count=limit, info=info)
    try:
        bar = tqdm(desc="faces", unit="frame", disable=not progress, total=limit)
        for i, frame in enumerate(frames):
            if i % 16 == 0:
                check_cancel(cancel)
            with clock("faces"):
                face = tracker.track(frame)
                if face is None:
                    aligner.reset()  # upstream's p_bias smoothing restarts after a gap
                    matrices.append(np.full((2, 3), np.nan, np.float32))
                    has_face.append(False)
                else:
                    matrices.append(aligner.matrix(face.anchors))
                    has_face.append(True)
            bar.update()
        bar.close()
    finally:
        frames.close()
        tracker.landmarker.close()
    if not matrices:
        return np.zeros((0, 2, 3), np.float32), np.zeros(0, bool)
    return np.stack(matrices), np.array(has_face)
