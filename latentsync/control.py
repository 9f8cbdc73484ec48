"""What every stage of a run is steered and measured by, on the ground floor (no other module of ours below it):
the caller's :class:`Cancel` and the run's :class:`StageClock`."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from latentsync.errors import Cancelled


class Cancel(Protocol):
    """What a run takes as its ``cancel``: anything that says whether the caller wants it stopped (a
    ``threading.Event``, Cog's cancel flag, a test's counter)."""

    def is_set(self) -> bool: ...


def check_cancel(cancel: Cancel | None) -> None:
    """Raise :class:`Cancelled` when ``cancel`` is set (None: never)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("lip-sync cancelled")


class StageClock:
    """Busy seconds per stage name; safe to use from several threads at once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
