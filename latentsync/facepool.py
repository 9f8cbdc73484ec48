"""Face detection in worker processes over frame ranges, so pass 1 keeps up with the GPU on a many-core machine.

mediapipe detects one frame at a time on one core. Each worker decodes its own range of frames (a seeked read
gives the same frames as a read from the start) and returns the faces of every frame; the caller takes the
ranges in order. Detection depends on each frame alone, so the faces equal a single process's. Imports stay
light here (no torch): spawned workers import only this module, ``face`` and ``video``.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from latentsync import video as video_mod
from latentsync.face import Face, FaceLandmarker

_landmarker: FaceLandmarker | None = None  # one per worker process


def _init_worker() -> None:
    global _landmarker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _landmarker = FaceLandmarker()
    # terminate() sends SIGTERM: unwind normally, so a read's ffmpeg child is killed by its generator's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def _detect_range(video: Path, fps: float, info: video_mod.VideoInfo, start: int, count: int) -> list[list[Face]]:
    frames = video_mod.read_frames(video, fps, start=start, count=count, info=info)
    try:
        return [_landmarker.detect(frame) for frame in frames]
    finally:
        frames.close()


class FacePool:
    """``workers`` spawned processes detecting faces; ``terminate()`` (also on any error) leaves none behind."""

    def __init__(self, workers: int):
        self.workers = int(workers)
        # spawn, not fork: the parent runs torch's and ffmpeg's threads, which a forked child would inherit broken.
        self._pool: Any = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_init_worker)

    def detect(self, video: Path, fps: float, info: video_mod.VideoInfo, limit: int | None,
               check: Callable[[], None] = lambda: None) -> Iterator[list[Face]]:
        """The faces of frames 0 … ``limit``−1 (all when None), in order; ``check()`` runs between ranges.

        At most two ranges per worker are in flight, so memory does not grow with the video's length.
        """
        if self._pool is None:
            raise RuntimeError("the face pool was terminated")
        total = limit if limit is not None else math.ceil(info.duration * fps) + 1
        block = min(max(math.ceil(total / (4 * self.workers)), 16), 128)
        pending: deque[tuple[int, Any]] = deque()
        nxt = 0
        while True:
            while len(pending) < 2 * self.workers and (limit is None or nxt < limit):
                count = block if limit is None else min(block, limit - nxt)
                pending.append((count, self._pool.apply_async(_detect_range, (video, fps, info, nxt, count))))
                nxt += count
            if not pending:
                return
            count, result = pending.popleft()
            while not result.ready():
                check()
                result.wait(0.1)
            faces = result.get()
            yield from faces
            if len(faces) < count:  # the video ended inside this range; later ranges are empty
                return

    @property
    def alive(self) -> bool:
        return self._pool is not None

    def close(self) -> None:
        """Let the workers finish and exit."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def terminate(self) -> None:
        """Stop the workers now (error, cancel); their ffmpeg readers stop with them."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def default_workers() -> int:
    """Detection workers worth starting here: none on small machines, where the other stages need the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 4 else min(cores - 4, 8)
