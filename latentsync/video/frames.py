"""Source frames by index for the synthesis pass: one forward stream, re-seeked only when the order breaks."""
from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import numpy as np

from latentsync.video.probe import VideoInfo
from latentsync.video.read import read_frames


class FrameFetcher:
    """Serves source frames by index, reading forwards in one stream and re-seeking only when order breaks."""

    def __init__(self, path: Path, fps: float, info: VideoInfo):
        self.path, self.fps, self.info = path, fps, info
        self._reader: Generator[np.ndarray, None, None] | None = None
        self._next = 0

    def _open(self, start: int) -> None:
        self.close()
        self._reader = read_frames(self.path, self.fps, start=start, info=self.info)
        self._next = start

    def get_range(self, first: int, last: int) -> list[np.ndarray]:
        """Frames ``first`` … ``last`` inclusive, in increasing order."""
        if self._reader is None or self._next != first:
            self._open(first)
        reader = self._reader
        assert reader is not None  # _open() has just made one where there was none
        frames = []
        for _ in range(last - first + 1):
            frame = next(reader, None)
            if frame is None:
                raise RuntimeError(f"{self.path}: the video ended before frame {self._next}")
            frames.append(frame)
            self._next += 1
        return frames

    def get(self, indices: list[int] | tuple[int, ...]) -> dict[int, np.ndarray]:
        """The frames at ``indices`` (any order, repeats allowed), reading each contiguous run once."""
        wanted = sorted(set(indices))
        out: dict[int, np.ndarray] = {}
        run_start = prev = wanted[0]
        for idx in wanted[1:] + [None]:
            if idx is not None and idx == prev + 1:
                prev = idx
                continue
            out.update(zip(range(run_start, prev + 1), self.get_range(run_start, prev), strict=True))
            if idx is not None:
                run_start = prev = idx
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
