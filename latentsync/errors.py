"""The errors a user may see: one base, split by whose move it is to fix the problem; and how a front door turns
an exception into its exit status and one line (:func:`describe`)."""
from __future__ import annotations

import signal

# Written once for the CLI, the batch command and predict.py; {where} is "GPU " or "".
OUT_OF_MEMORY = "out of {where}memory on this video; try a shorter or lower-resolution video, fewer inference steps, " \
                "a smaller dtype (fp16/bf16) or another device"


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
    """SIGINT or SIGTERM stopped the run (raised by the front door's signal handler in the main thread).

    A BaseException like ``KeyboardInterrupt``: ``except Exception`` does not swallow it, while every ``finally``
    on the way out still runs, so readers and writers kill their ffmpeg and temporary files are removed.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def one_line(error: BaseException) -> str:
    """An error's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def is_out_of_memory(error: BaseException) -> bool:
    """Host or GPU memory ran out (torch's ``OutOfMemoryError``, or a CUDA "out of memory" ``RuntimeError``)."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def describe(error: BaseException, signum: int | None = None) -> tuple[int, str] | None:
    """The exit status and one-line message for an exception meant for the user (``signum``: the signal that
    stopped the run, if one did); None for a bug, which the caller re-raises.

    2: the input is at fault, 1: the machine (disk, network, memory), 128+N: a signal (130 Ctrl-C, 143 SIGTERM).
    """
    if signum is not None or isinstance(error, (Interrupted, KeyboardInterrupt)):
        # After a signal, whatever surfaced (Interrupted, or a cancel noticed first) is the signal's doing.
        signum = signum if signum is not None else getattr(error, "signum", signal.SIGINT)
        return 128 + signum, str(Interrupted(signum))
    if isinstance(error, InputError):
        return 2, one_line(error)
    if isinstance(error, ResourceError):
        return 1, one_line(error)
    if is_out_of_memory(error):
        return 1, OUT_OF_MEMORY.format(where="" if isinstance(error, MemoryError) else "GPU ")
    if isinstance(error, OSError) and error.strerror:  # the file system said no: a full disk, a vanished mount, ...
        where = f": {error.filename}" if error.filename else ""
        return 1, f"{error.strerror}{where}"
    return None
