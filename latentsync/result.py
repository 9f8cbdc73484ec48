"""What a run gives its caller: the :class:`LipSyncResult`, and the one summary of it that every front door shows."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the result holds a score; importing syncscore (torch) is the scorer's business
    from latentsync.syncscore import SyncScore


@dataclass
class LipSyncResult:
    """What a run produced: the mp4, the seed actually used, frame counts and busy seconds per stage (+ wall)."""

    output: Path
    seed: int
    frames: int
    frames_with_face: int
    fps: float
    seconds: dict[str, float] = field(default_factory=dict)
    sync: SyncScore | None = None  # None: no SyncNet loaded, or the output too short to score
    ranges: tuple[tuple[float, float], ...] = ()  # seconds of the output lip-synced (empty: the whole video)


# What a metric may hold: what JSON writes and Cog's record_metric takes (None there deletes the metric).
Metric = int | float | str | bool | list | dict | None


def summary_lines(result: LipSyncResult, *, show_output: bool = True) -> list[str]:
    """What a person reads about a run, a line each: what was made (``show_output`` False where the output's path
    means nothing to the reader, as in Cog's logs), the ranges lip-synced, the sync score."""
    if show_output:
        lines = [(f"wrote {result.output}: {result.frames} frames at {result.fps:g} fps, "
                  f"{result.frames_with_face} with a face, seed {result.seed}")]
    else:
        lines = [f"seed: {result.seed}; {result.frames} frames, {result.frames_with_face} with a face"]
    if result.ranges:
        listed = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in result.ranges)
        lines.append(f"lip-synced {listed} s ({result.frames_with_face} frames with a face); the rest passed through")
    if result.sync is not None:
        s = result.sync
        lines.append(f"sync: offset-0 cosine {s.offset0_cosine:.3f}, best offset {s.best_offset:+d} frames, "
                     f"confidence {s.confidence:.3f} ({s.windows} windows)")
    return lines


def metrics(result: LipSyncResult) -> dict[str, Metric]:
    """The run in numbers, JSON-ready: ``seed``, ``frames``, ``frames_with_face``, ``fps``, ``seconds`` (busy
    seconds per stage, + ``wall``), ``sync`` (None: not scored) and ``ranges`` (``[start, stop]`` seconds; []: all)."""
    sync = None if result.sync is None else {
        "offset0_cosine": round(float(result.sync.offset0_cosine), 4), "best_offset": int(result.sync.best_offset),
        "confidence": round(float(result.sync.confidence), 4), "windows": int(result.sync.windows)}
    return {"seed": int(result.seed), "frames": int(result.frames), "frames_with_face": int(result.frames_with_face),
            "fps": float(result.fps), "seconds": {k: round(float(v), 3) for k, v in result.seconds.items()},
            "sync": sync,
            "ranges": [[round(a, 3), round(b, 3)] for a, b in result.ranges]}  # milliseconds: finer than a frame
