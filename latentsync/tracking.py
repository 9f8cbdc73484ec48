"""Pass 1, face tracking: the smoothed affine matrix of the tracked face in every source frame.

Only the 2×3 matrices are kept (a few bytes a frame). Detection depends on each frame alone (mediapipe in
static-image mode), so it may run in worker processes over frame ranges (``facepool``); the choice of which face
to follow and the aligner's smoothing depend on the frames before, so they run here, in frame order. The pass is
a stream (``FaceTrack``): synthesis may start on the first chunks while later frames are still being tracked.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from latentsync import video as video_mod
from latentsync.align import FaceAligner
from latentsync.errors import InputError
from latentsync.face import Face, FaceLandmarker, FaceTracker, no_face_message
from latentsync.facepool import FacePool
from latentsync.progress import FACES, Progress, as_progress
from latentsync.stages import StageClock, check_cancel


class _Detected:
    """A landmarker stand-in that hands the tracker faces detected elsewhere, one frame's list per call."""

    def __init__(self, faces: Iterator[list[Face]]):
        self._faces = faces

    def detect(self, _frame: Any) -> list[Face]:
        return next(self._faces)


class FaceTrack:
    """Pass 1 over the first ``limit`` frames (all when None) at ``fps``, tracked on demand: ``ensure(n)``.

    ``matrices`` (2×3 float32, NaN where the face is missing) and ``has_face`` grow as frames are tracked; the
    face followed is the largest, or the one nearest ``point``. With ``pool`` the detection runs in its worker
    processes (same results), else here on ``landmarker`` (one is made when None). ``finish()`` tracks to the
    end and checks; used as a context manager, an error or a cancel terminates the pool on the way out, so no
    worker or ffmpeg process outlives it. ``progress`` counts the frames tracked (True: a bar on stderr). With
    ``horizon``, once that many frames are tracked and the face was seen, later frames are only counted (no face, NaN
    matrix): a run that edits nothing past them needs no more.
    """

    def __init__(self, video: Path, fps: float, info: video_mod.VideoInfo, limit: int | None,
                 point: tuple[float, float] | None, resolution: int, *, clock: StageClock,
                 pool: FacePool | None = None, landmarker: FaceLandmarker | None = None, cancel: Any = None,
                 progress: bool | Progress = False, horizon: int | None = None):
        self.video, self.info, self.clock, self.pool, self.cancel = video, info, clock, pool, cancel
        self.horizon, self._seen = horizon, False
        self.matrices: list[np.ndarray] = []
        self.has_face: list[bool] = []
        self.ended = self._closed = False
        self._aligner = FaceAligner(resolution)
        self._own = self._frames = None
        if pool is None:
            if landmarker is None:
                with clock("faces"):
                    landmarker = self._own = FaceLandmarker()
            self._frames = video_mod.read_frames(video, fps, count=limit, info=info)
            faces = (landmarker.detect(frame) for frame in self._frames) if horizon is None else (
                [] if self._past(i) else landmarker.detect(frame) for i, frame in enumerate(self._frames))
        elif horizon is None or (limit is not None and limit <= horizon):
            faces = pool.detect(video, fps, info, limit, check=lambda: check_cancel(cancel))
        else:
            faces = self._pooled(pool, fps, limit, horizon)
        self._faces = faces
        self._tracker = FaceTracker(landmarker=_Detected(faces), point=point)
        self.progress = as_progress(progress)
        frames = video_mod.expected_frames(info, fps)
        self.progress.start(FACES, frames if limit is None else min(limit, frames))

    def ensure(self, n: float) -> None:
        """Track until ``n`` frames are known or the video has ended."""
        while not self.ended and len(self.matrices) < n:
            if len(self.matrices) % 16 == 0:
                check_cancel(self.cancel)
            with self.clock("faces"):
                try:
                    face = self._tracker.track(None)
                except StopIteration:
                    self.ended = True
                    break
                if face is None:
                    self._aligner.reset()  # upstream's p_bias smoothing restarts after a gap
                    self.matrices.append(np.full((2, 3), np.nan, np.float32))
                    self.has_face.append(False)
                else:
                    self.matrices.append(self._aligner.matrix(face.anchors))
                    self.has_face.append(True)
                    self._seen = True
            self.progress.advance(FACES)

    def _past(self, i: int) -> bool:
        """Whether frame ``i`` (asked for once frames 0 … i−1 are tracked) is only counted, not detected."""
        return self.horizon is not None and i >= self.horizon and self._seen

    def _pooled(self, pool: FacePool, fps: float, limit: int | None, horizon: int) -> Iterator[list[Face]]:
        """The pool's faces up to ``horizon``, then (the face seen) frames read here only to be counted."""
        def check() -> None:
            check_cancel(self.cancel)

        yield from pool.detect(self.video, fps, self.info, horizon, check=check)
        if len(self.has_face) < horizon:  # the video ended before the horizon
            return
        if not self._seen:  # no face yet: detect on, so a face found later is followed as in a whole run
            yield from pool.detect(self.video, fps, self.info, limit, check=check, start=horizon)
            return
        count = None if limit is None else limit - horizon
        with contextlib.closing(video_mod.read_frames(self.video, fps, start=horizon, count=count,
                                                      info=self.info)) as frames:
            for _ in frames:
                yield []

    def check(self) -> None:
        """Once the video has ended: an ``InputError`` when no frame could be read or none shows the face."""
        if not self.ended:
            return
        if not self.matrices:
            raise InputError(f"{self.video}: no video frames could be read")
        if not any(self.has_face):
            raise InputError(no_face_message(str(self.video), self.info.height, self.info.width))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Track every frame, check, stop reading: the arrays. On an error the workers are stopped too."""
        with self:
            self.ensure(math.inf)
            self.check()
        return self.arrays()

    def __enter__(self) -> FaceTrack:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 2, 3)`` matrices and ``(N,)`` has_face of the frames tracked so far."""
        if not self.matrices:
            return np.zeros((0, 2, 3), np.float32), np.zeros(0, bool)
        return np.stack(self.matrices), np.array(self.has_face)

    def close(self, failed: bool = False) -> None:
        """Stop reading and detecting (the workers too, after a failure); once is enough."""
        if self._closed:
            return
        self._closed = True
        if failed and self.pool is not None:
            self.pool.terminate()
        self.progress.end(FACES, failed=failed)
        self._faces.close()
        if self._frames is not None:
            self._frames.close()
        if self._own is not None:
            self._own.close()
