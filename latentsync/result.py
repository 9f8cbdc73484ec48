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
