"""Ctrl-C and SIGTERM for the CLI and the batch command: the run stops the way a cancel does, then the process
exits with 128+N (130, 143).

In the main thread a signal raises :class:`~latentsync.errors.Interrupted`, so every ``finally`` on the way out
runs (ffmpeg killed, temporary files removed, Ray workers stopped). While :attr:`Stop.defer` is true (the lip-sync
run itself) it only sets :attr:`Stop.cancel`: the run stops at its next check (between chunks, denoising steps,
face-pass frames). An exception raised at an arbitrary line could land inside ``subprocess.Popen`` between fork and
exec and orphan the child.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from latentsync.errors import Interrupted, describe

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stop:
    """The signal that stopped the run (None until one came), and the event that cancels a deferred run."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.signum: int | None = None
        self.defer = False

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            return  # the first signal's clean-up is running; a second one must not cut it short
        self.signum = signum
        self.cancel.set()
        if self.defer:
            return
        # The exception may land inside a half-built object whose __del__ then fails (tqdm does): that noise,
        # printed as "Exception ignored in …", is not the user's business once the run is being stopped.
        sys.unraisablehook = _ignore
        raise Interrupted(signum)

    @contextlib.contextmanager
    def handling(self) -> Iterator[Stop]:
        """Handle SIGINT and SIGTERM here until the block ends, then restore the previous handlers. Called again
        after a library installed its own (``ray.init`` does, for SIGTERM)."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield self
            return
        previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        hook = sys.unraisablehook
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            sys.unraisablehook = hook

    @contextlib.contextmanager
    def deferred(self) -> Iterator[threading.Event]:
        """During the block a signal only sets :attr:`cancel` (yielded, for the run to check)."""
        self.defer = True
        try:
            yield self.cancel
        finally:
            self.defer = False


def _ignore(unraisable) -> None:
    pass


def stop_on_signals() -> contextlib.AbstractContextManager[Stop]:
    """A fresh :class:`Stop` handling SIGINT and SIGTERM for the block (in the main thread; elsewhere none)."""
    return Stop().handling()


def run_door(body: Callable[[Stop], int], *, stopped: str, progress: bool = False) -> int:
    """Run a front door's ``body(stop)`` with SIGINT and SIGTERM handled, and return its exit status. A failure
    meant for the user (:func:`~latentsync.errors.describe`) becomes one ``error: …`` line on stderr and its status;
    a bug is re-raised. ``stopped`` ends the line after a signal (what was left behind); ``progress``: bars may be
    on screen, and a signal may have cut a redraw short, mid-line, so the line then starts on a line of its own."""
    with stop_on_signals() as stop:
        try:
            return body(stop)
        except BaseException as e:  # noqa: B036 — sorted by describe(); anything it cannot name is re-raised
            failure = describe(e, stop.signum)
            if failure is None:
                raise
    status, message = failure
    if status >= 128:
        message = f"{message}; {stopped}"
    lead = "\n" if stop.signum is not None and progress else ""
    print(f"{lead}error: {message}", file=sys.stderr)
    return status


def exit_with(status: int) -> None:
    """Exit with ``status``. After a signal our own clean-up has already run (ffmpeg stopped, temporary files
    removed, workers stopped); the interpreter's teardown is then skipped, because tearing down mediapipe's and
    torch's native threads at exit can abort the process (SIGABRT) instead of exiting with 128+N."""
    if status >= 128:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
