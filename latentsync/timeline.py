"""Which source frame each output frame shows: loop modes, output length, 16-frame chunks, face-less fill."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from latentsync.audio import SAMPLE_RATE

FADE_FRAMES = 6  # frames beyond each inner edge of a range over which the lip-synced face fades in or out


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
    pad = silence_length(len(wav), num_out, fps) - len(wav)
    return np.concatenate([wav, np.zeros(pad, dtype=np.float32)])


def silence_length(samples: int, num_out: int, fps: float) -> int:
    """How many samples ``pad_with_silence`` makes of ``samples`` for ``num_out`` frames at ``fps``."""
    return max(int(math.ceil(num_out / fps * SAMPLE_RATE)), samples)


@dataclass(frozen=True)
class Chunk:
    """One window of output frames the model sees at once: where it starts, and each frame's source frame."""

    index: int
    start: int  # first output frame
    src: tuple[int, ...]  # source frame of each output frame
    has_face: tuple[bool, ...]
    weight: tuple[float, ...] = ()  # share of the lip-synced face in each output frame (empty: 1 everywhere)

    @property
    def stop(self) -> int:
        return self.start + len(self.src)

    @property
    def any_face(self) -> bool:
        return any(self.has_face)

    def share(self, k: int) -> float:
        """How much of the lip-synced face frame ``k`` of the chunk shows (0: the source frame as it is)."""
        return self.weight[k] if self.weight else 1.0

    @property
    def edited(self) -> bool:
        """Whether any frame of the chunk shows a lip-synced face (else the chunk passes through)."""
        return any(h and self.share(k) > 0 for k, h in enumerate(self.has_face))


def chunk_at(index: int, size: int, num_out: int, order: str, has_face: np.ndarray,
             weights: np.ndarray | None = None) -> Chunk:
    """Chunk ``index`` of ``size`` output frames; ``has_face`` says per source frame whether the face was found,
    ``weights`` per output frame how much of the lip-synced face it shows (None: all of it, everywhere)."""
    start = index * size
    stop = min(start + size, num_out)
    src = tuple(source_index(j, len(has_face), order) for j in range(start, stop))
    weight = () if weights is None else tuple(float(w) for w in weights[start:stop])
    return Chunk(index, start, src, tuple(bool(has_face[s]) for s in src), weight)


def range_frames(ranges: tuple[tuple[float, float], ...], fps: float, num_out: int) -> list[tuple[int, int]]:
    """Output-frame spans ``[first, stop)`` of time ranges in seconds: the frames whose start time lies in a range,
    cut at ``num_out``; ranges with no frame left are dropped."""
    spans = []
    for start, stop in ranges:
        first = min(math.ceil(start * fps - 1e-6), num_out)
        end = min(math.ceil(stop * fps - 1e-6), num_out)
        if end > first:
            spans.append((first, end))
    return spans


def edit_weights(spans: list[tuple[int, int]], num_out: int) -> np.ndarray:
    """Per output frame, the lip-synced face's share: 1 inside ``spans``, falling linearly to 0 over
    ``FADE_FRAMES`` frames beyond each edge (so the mouth closes or opens within the fade), 0 elsewhere."""
    j = np.arange(num_out, dtype=np.float64)
    weights = np.zeros(num_out, np.float32)
    for first, stop in spans:
        outside = np.maximum(first - j, j - (stop - 1))  # frames beyond the span, ≤ 0 inside it
        weights = np.maximum(weights, np.clip(1 - outside / (FADE_FRAMES + 1), 0, 1).astype(np.float32))
    return weights


def touched_chunks(spans: list[tuple[int, int]], size: int, num_out: int) -> list[int]:
    """The chunks holding a frame of ``spans`` or of their fades: the only ones the model must generate."""
    chunks: set[int] = set()
    for first, stop in spans:
        a, b = max(first - FADE_FRAMES, 0), min(stop + FADE_FRAMES, num_out)
        chunks.update(range(a // size, (b - 1) // size + 1))
    return sorted(chunks)
