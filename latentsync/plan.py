"""What a run is made of: the ``Plan`` decided once per video, the ``RenderPart``s rendered from it (anywhere, in
any number of chunk ranges), and the ``LipSyncResult`` that ``finish`` makes of them. All picklable."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentsync import video as video_mod
from latentsync.options import RunOptions
from latentsync.timeline import source_index


@dataclass
class LipSyncResult:
    """What a run produced: the mp4, the seed actually used, frame counts and busy seconds per stage (+ wall)."""

    output: Path
    seed: int
    frames: int
    frames_with_face: int
    fps: float
    seconds: dict[str, float] = field(default_factory=dict)
    sync: Any = None  # a SyncScore when SyncNet is loaded


@dataclass
class Plan:
    """Everything ``render`` and ``finish`` need, decided once per video; picklable (paths, arrays, numbers)."""

    video: Path
    audio: Path
    options: RunOptions  # validated, with the concrete seed of this run
    info: video_mod.VideoInfo
    fps: float  # processing and output frame rate
    wav: np.ndarray  # 16 kHz mono float32, padded with silence to the output's length where `silence` needs it
    features: np.ndarray  # Whisper features (rows, states, hidden) of ``wav``
    matrices: np.ndarray  # (num_source, 2, 3) float32 frame→crop matrices, NaN where the face is missing
    has_face: np.ndarray  # (num_source,) bool
    num_out: int  # output frames
    order: str  # "bounce" or "loop": the source order past the video's end
    chunk_size: int  # output frames per chunk (the model's 16)
    sync_spans: list[tuple[int, int]]  # output-frame spans whose generated crops are scored
    seconds: dict[str, float] = field(default_factory=dict)  # busy seconds of planning

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_out / self.chunk_size)

    @property
    def frames_with_face(self) -> int:
        return sum(bool(self.has_face[source_index(j, len(self.has_face), self.order)]) for j in range(self.num_out))


@dataclass
class RenderPart:
    """What ``render`` wrote: a silent H.264 file of output chunks ``chunks``, busy seconds and the sync crops."""

    path: Path
    chunks: range
    frames: int
    seconds: dict[str, float]
    sync_scores: dict[tuple[int, int], Any]  # span of ``Plan.sync_spans`` → its SyncScore (None: unscorable)
    sync_crops: dict[int, np.ndarray]  # output frame → SyncNet crop, for the spans not scored here
