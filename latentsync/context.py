"""What every hop of one run passes down (plan → render → finish): :class:`RunContext`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from latentsync.control import Cancel
from latentsync.facepool import Detectors
from latentsync.loader import Models
from latentsync.media import MediaCaps
from latentsync.progress import Progress, Watched, as_progress


@dataclass(frozen=True)
class RunContext:
    """The loaded models, the face detectors kept between runs, the deployment's input caps, the caller's cancel
    (watched: each check lets timed progress lines speak) and progress, and the debugging hooks of ``LipSync``
    (``serial`` stages, a ``tap`` that sees each output frame before it is encoded)."""

    models: Models
    detectors: Detectors
    face_workers: int
    caps: MediaCaps
    cancel: Cancel
    progress: Progress
    serial: bool = False
    tap: Callable[[int, np.ndarray], None] | None = None

    @classmethod
    def make(cls, models: Models, detectors: Detectors, face_workers: int, caps: MediaCaps, *,
             cancel: Cancel | None, progress: bool | Progress | None, serial: bool = False,
             tap: Callable[[int, np.ndarray], None] | None = None) -> RunContext:
        """A context from what the API takes (``progress``: True for bars on stderr, a Progress, or None)."""
        watched = as_progress(progress)
        return cls(models, detectors, face_workers, caps, Watched(cancel, watched), watched, serial, tap)
