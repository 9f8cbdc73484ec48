"""The errors a user may see: one base, split by whose move it is to fix the problem."""
from __future__ import annotations

import signal


class LatentSyncError(Exception):
    """Base of every error whose message is meant for the user as is (no traceback needed)."""


class InputError(LatentSyncError, ValueError):
    """A user-supplied input (file, option, weights folder, output path) is unusable; the message says what to do.

    Programming errors stay ordinary exceptions; this one is safe to show to an end user as is (CLI exit status 2).
    """


class ResourceError(LatentSyncError, RuntimeError):
    """The machine, not the input: a full disk, no GPU, an unreachable download (CLI exit status 1)."""


class Cancelled(Exception):
    """The caller's cancel event was set; the run stopped between chunks and cleaned up."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the run (raised by the CLI's signal handler in the main thread).

    A BaseException like ``KeyboardInterrupt``: ``except Exception`` does not swallow it, while every ``finally``
    on the way out still runs, so readers and writers kill their ffmpeg and temporary files are removed.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"
