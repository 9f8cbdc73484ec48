"""Which source frame each output frame shows: loop modes, output length, 16-frame chunks, face-less fill."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from latentsync.audio import SAMPLE_RATE


def source_index(j: int, num_source: int, loop_mode: str) -> int:
    """Which source frame output frame ``j`` shows: upstream's ping-pong (``bounce``) or a plain restart (``loop``)."""
    if j < num_source:
        return j
    segment, offset = divmod(j, num_source)
    if loop_mode == "bounce" and segment % 2 == 1:
        return num_source - 1 - offset
    return offset


def nearest_with_face(has_face: list[bool]) -> list[int]:
    """For each position, the nearest position whose frame has the face (itself when it has one)."""
    have = [i for i, h in enumerate(has_face) if h]
    return [min(have, key=lambda k: (abs(k - i), k)) for i in range(len(has_face))]


def output_length(loop_mode: str, num_source: int, audio_frames: int) -> tuple[int, str]:
    """Output frame count and the looping order used past the end of the video.

    ``bounce``/``loop``: the audio's length (upstream's rule), the video looped or cut to it. ``cut_off``: the
    shorter of the two. ``silence``: a longer video is kept whole (the audio padded with silence); a shorter one
    bounces, as by default.
    """
    order = "loop" if loop_mode == "loop" else "bounce"
    if loop_mode == "cut_off":
        return min(num_source, audio_frames), order
    if loop_mode == "silence":
        return max(num_source, audio_frames), order
    return audio_frames, order


def pad_with_silence(wav: np.ndarray, num_out: int, fps: float) -> np.ndarray:
    """``wav`` (16 kHz mono) padded with silence to cover ``num_out`` frames at ``fps``: ``silence`` mode with a
    video longer than the audio, so the mouth closes over the rest of the video."""
    pad = int(math.ceil(num_out / fps * SAMPLE_RATE)) - len(wav)
    return np.concatenate([wav, np.zeros(max(pad, 0), dtype=np.float32)])


@dataclass(frozen=True)
class Chunk:
    """One window of output frames the model sees at once: where it starts, and each frame's source frame."""

    index: int
    start: int  # first output frame
    src: tuple[int, ...]  # source frame of each output frame
    has_face: tuple[bool, ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.src)

    @property
    def any_face(self) -> bool:
        return any(self.has_face)


def chunk_at(index: int, size: int, num_out: int, order: str, has_face: np.ndarray) -> Chunk:
    """Chunk ``index`` of ``size`` output frames; ``has_face`` says per source frame whether the face was found."""
    start = index * size
    stop = min(start + size, num_out)
    src = tuple(source_index(j, len(has_face), order) for j in range(start, stop))
    return Chunk(index, start, src, tuple(bool(has_face[s]) for s in src))
