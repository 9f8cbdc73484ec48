"""The item that travels through the synthesis stages: one chunk, its frames, and what each stage made of them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from latentsync.timeline import Chunk


@dataclass
class Work:
    """One chunk on its way through the synthesis stages."""

    chunk: Chunk
    frames: dict[int, np.ndarray]  # source frame index → RGB frame
    pixels: torch.Tensor | None = None  # (f, 3, R, R) aligned faces in [−1, 1], model dtype, on the device
    faces: torch.Tensor | None = None  # (f, 3, R, R) generated faces, original pixels outside the mouth mask
    sync: dict[int, np.ndarray] = field(default_factory=dict)  # output frame → SyncNet crop (sampled spans only)
    ready: Any = None  # CUDA event after the kernels that made ``pixels`` or ``faces`` (None off CUDA)


class FaceSource(Protocol):
    """Where the align and paste stages find the face: a plan's matrices, or an open plan's growing face track."""

    def matrix(self, src: int) -> np.ndarray:
        """The 2×3 frame→crop matrix of source frame ``src`` (tracked already)."""
        ...


class FeatureSource(Protocol):
    """Where the generate stage finds the Whisper features: a plan, whose features an open one may swap for the
    padded audio's once its length settles (the rows read before are the same in both)."""

    @property
    def features(self) -> np.ndarray: ...
