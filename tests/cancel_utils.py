"""A cancel event for tests: becomes set after a given number of checks, i.e. part-way through a run."""
from __future__ import annotations


class CancelAfter:
    """``is_set()`` is False for the first ``n`` calls, then True."""

    def __init__(self, n: int):
        self.n = n

    def is_set(self) -> bool:
        self.n -= 1
        return self.n < 0
