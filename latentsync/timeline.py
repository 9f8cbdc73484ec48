"""Which source frame each output frame shows (loop modes, output length, 16-frame chunks, face-less fill), and
what a run with time ranges edits (``Edits``: written once, seconds become frames here only)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from latentsync.audio import FEATURES_PER_SECOND, SAMPLE_RATE, WINDOW_OFFSETS
from latentsync.errors import InputError

log = logging.getLogger(__name__)

FADE_FRAMES = 6  # frames beyond each inner edge of a range, and inside each end of a face's run in the video,
# over which the lip-synced face fades in or out


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


def face_share(has_face: np.ndarray | list[bool], s: int) -> float:
    """How much of the lip-synced face source frame ``s`` shows, by where the face is: 0 without it, rising over
    the ``FADE_FRAMES`` frames at each end of a run of frames with the face where the face appears or leaves
    (the video's first and last frames are no such end), 1 elsewhere. Needs ``has_face`` up to ``s + FADE_FRAMES``
    (or the video's end)."""
    if not has_face[s]:
        return 0.0
    for d in range(1, FADE_FRAMES + 1):
        if (s - d >= 0 and not has_face[s - d]) or (s + d < len(has_face) and not has_face[s + d]):
            return d / (FADE_FRAMES + 1)
    return 1.0


def chunk_at(index: int, size: int, num_out: int, order: str, has_face: np.ndarray | list[bool],
             blend: np.ndarray | None = None) -> Chunk:
    """Chunk ``index`` of ``size`` output frames; ``has_face`` says per source frame whether the face was found
    (known to ``FADE_FRAMES`` past the chunk's sources, or to the video's end), ``blend`` per output frame how
    much of the lip-synced face the edit gives it (None: all of it, everywhere). A frame's weight is the product
    of its blend and its source's :func:`face_share`."""
    start = index * size
    stop = min(start + size, num_out)
    src = tuple(source_index(j, len(has_face), order) for j in range(start, stop))
    shares = [face_share(has_face, s) if has_face[s] else 1.0 for s in src]  # a frame without the face is kept
    weight: tuple[float, ...] = ()
    if blend is not None:
        weight = tuple(float(w) * share for w, share in zip(blend[start:stop], shares, strict=True))
    elif any(share != 1 for share in shares):
        weight = tuple(shares)
    return Chunk(index, start, src, tuple(bool(has_face[s]) for s in src), weight)


def range_frames(ranges: tuple[tuple[float, float], ...], fps: float, num_out: int | None = None
                 ) -> list[tuple[int, int]]:
    """Output-frame spans ``[first, stop)`` of time ranges in seconds: the frames whose start time lies in a range
    (the one place seconds become frames), cut at ``num_out`` (None: wherever the output ends); ranges with no
    frame left are dropped."""
    spans = []
    for start, stop in ranges:
        first, end = math.ceil(start * fps - 1e-6), math.ceil(stop * fps - 1e-6)
        if num_out is not None:
            first, end = min(first, num_out), min(end, num_out)
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


def touched_chunks(spans: list[tuple[int, int]], size: int, num_out: int | None = None) -> list[int]:
    """The chunks holding a frame of ``spans`` or of their fades (cut at ``num_out``; None: no end): the only ones
    the model must generate."""
    return sorted({c for run in chunk_runs(spans, size, num_out) for c in run})


def chunk_runs(spans: list[tuple[int, int]] | tuple[tuple[int, int], ...], size: int, num_out: int | None = None
               ) -> list[range]:
    """:func:`touched_chunks` as one range of chunks per span (however far a span reaches, a few numbers)."""
    runs = []
    for first, stop in spans:
        a, b = max(first - FADE_FRAMES, 0), stop + FADE_FRAMES
        if num_out is not None:
            b = min(b, num_out)
        runs.append(range(a // size, (b - 1) // size + 1))
    return runs


def check_ranges(ranges: tuple[tuple[float, float], ...], fps: float, longest: float | None = None) -> None:
    """An ``InputError`` naming a range in which no frame starts at ``fps`` (so it edits nothing), or, with
    ``longest`` (seconds the output can last at most), ranges that all begin after the output's end."""
    for start, stop in ranges:
        if not range_frames(((start, stop),), fps):
            raise InputError(f"range {start:g}-{stop:g} holds no frame: at {fps:g} fps a frame starts every "
                             f"{1 / fps:.3f} s; widen it")
    if longest is not None and ranges and all(start >= longest - 1e-6 for start, _ in ranges):
        listed = ", ".join(f"{a:g}-{b:g}" for a, b in ranges)
        raise InputError(f"ranges {listed} lie past the end of the output ({longest:.2f} s at most); give times "
                         "within it")


@dataclass(frozen=True)
class Edits:
    """What a run with time ranges edits, decided once from the options' ranges at the run's frame rate, before the
    output's length is known (frames past its end are never rendered): the frame spans, the chunks to generate, the
    source frames pass 1 must track and the Whisper rows those chunks read. :meth:`at` cuts it to an output."""

    ranges: tuple[tuple[float, float], ...]  # the options' ranges, seconds, sorted and merged
    fps: float
    size: int  # output frames per chunk
    spans: tuple[tuple[int, int], ...]  # frames whose start time lies in a range
    chunks: tuple[range, ...]  # per span, the chunks holding a frame of it or of its fades

    @classmethod
    def of(cls, ranges: tuple[tuple[float, float], ...], fps: float, size: int) -> Edits | None:
        """The edits of ``ranges`` (None without ranges: the whole video is edited)."""
        if not ranges:
            return None
        check_ranges(ranges, fps)
        spans = range_frames(ranges, fps)
        return cls(ranges, fps, size, tuple(spans), tuple(chunk_runs(spans, size)))

    @property
    def face_window(self) -> tuple[int, int]:
        """The source frames pass 1 must track, ``[first, horizon)``: from the start of the first chunk edited to
        the end of the last. Before the horizon an output frame is its own source frame (each chunk aligns and
        pastes with its own frames' matrices); ranges that cover the whole output reach past its end: all."""
        return self.chunks[0].start * self.size, self.chunks[-1].stop * self.size

    @property
    def feature_rows(self) -> list[tuple[int, int]]:
        """The Whisper feature rows the edited chunks read, a run of rows per span's chunks (their frames' windows,
        a row of margin each side)."""
        per_frame = FEATURES_PER_SECOND / self.fps
        lo, hi = int(WINDOW_OFFSETS.min()), int(WINDOW_OFFSETS.max())
        return [(math.floor(run.start * self.size * per_frame) + lo - 1,
                 math.ceil((run.stop * self.size - 1) * per_frame) + hi + 2) for run in self.chunks]

    def blend(self, num_out: int, frames: int | None = None) -> np.ndarray:
        """Per output frame ``0 … frames − 1`` (default ``num_out``) of an output of ``num_out`` frames, the
        lip-synced face's share (:func:`edit_weights` of the spans cut there)."""
        return edit_weights(range_frames(self.ranges, self.fps, num_out), num_out if frames is None else frames)

    def at(self, num_out: int) -> Edited:
        """What an output of ``num_out`` frames edits. A range past its end is cut there with a warning; ranges that
        cover the whole output are the whole run (no blend), so they give its very bytes; none left is an
        ``InputError``."""
        duration = num_out / self.fps
        spans = range_frames(self.ranges, self.fps, num_out)
        for start, stop in self.ranges:
            if stop > duration + 1e-6:
                log.warning("range %g-%g runs past the end of the output (%.2f s): %s", start, stop, duration,
                            "cut there" if start < duration else "left out")
        if not spans:
            listed = ", ".join(f"{a:g}-{b:g}" for a, b in self.ranges)
            raise InputError(f"ranges {listed} lie past the end of the output ({duration:.2f} s); give times "
                             "within it")
        if spans == [(0, num_out)]:
            return Edited.whole(num_out)
        return Edited(edit_weights(spans, num_out), tuple((a / self.fps, b / self.fps) for a, b in spans),
                      tuple(spans))


@dataclass(frozen=True)
class Edited:
    """What an output of a known length edits: the lip-synced face's share per frame (None: every frame, whole),
    the ranges cut to the output in seconds (empty: the whole video) and their frame spans."""

    blend: np.ndarray | None
    ranges: tuple[tuple[float, float], ...]
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def whole(cls, num_out: int) -> Edited:
        return cls(None, (), ((0, num_out),))


def edited(edits: Edits | None, num_out: int) -> Edited:
    """What an output of ``num_out`` frames edits (``edits`` None: the whole video)."""
    return Edited.whole(num_out) if edits is None else edits.at(num_out)
