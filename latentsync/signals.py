"""Ctrl-C and SIGTERM for the CLI and the batch command: the run stops the way a cancel does, then the process
exits with 128+N (130, 143).

In the main thread a signal raises :class:`~latentsync.errors.Interrupted`, so every ``finally`` on the way out
runs (ffmpeg killed, temporary files removed, Ray workers stopped). While :attr:`Stop.defer` is true (the lip-sync
run itself) it only sets :attr:`Stop.cancel`: the run stops at its next check (between chunks, denoising steps,
face-pass frames). An exception raised at an arbitrary line could land inside ``subprocess.Popen`` between fork and
exec and orphan the child. Once the run's output is in place (:meth:`Stop.finished`) a signal no longer stops
anything: the run has succeeded, the summary still prints, and one during the interpreter's teardown ends the
process at once with status 0 (never a traceback, never -N).
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

    def __init__(self, *, exits: bool = False) -> None:
        self.exits = exits  # the process exits right after the handling block (a command's entry point)
        self.cancel = threading.Event()
        self.signum: int | None = None
        self.defer = False
        self.done = False

    def handle(self, signum: int, frame) -> None:
        if self.done or self.signum is not None:
            return  # the run succeeded; or the first signal's clean-up is running and must not be cut short
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
                signal.signal(s, _exit_done if self.done and self.exits else handler)
            sys.unraisablehook = hook

    def finished(self) -> None:
        """The run's output is in place: from here to the process's end a signal changes nothing of the outcome (the
        status is 0); after the handling block, where the process exits next, it ends the process at once with 0."""
        self.done = True

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


def _exit_done(signum: int, frame) -> None:
    """A signal after a successful run: what was printed goes out, then the process ends with 0, skipping the
    rest of the teardown (the run's own clean-up is done; face workers exit when their pipe closes)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def stop_on_signals(*, exits: bool = False) -> contextlib.AbstractContextManager[Stop]:
    """A fresh :class:`Stop` handling SIGINT and SIGTERM for the block (in the main thread; elsewhere none)."""
    return Stop(exits=exits).handling()


def run_door(body: Callable[[Stop], int], *, stopped: str, progress: bool = False, exits: bool = False) -> int:
    """Run a front door's ``body(stop)`` with SIGINT and SIGTERM handled, and return its exit status. A failure
    meant for the user (:func:`~latentsync.errors.describe`) becomes one ``error: …`` line on stderr and its status;
    a bug is re-raised. ``stopped`` ends the line after a signal (what was left behind); ``progress``: bars may be
    on screen, and a signal may have cut a redraw short, mid-line, so the line then starts on a line of its own.
    ``exits``: the process exits with the status next (:func:`exit_with`), and a signal after the body called
    :meth:`Stop.finished` ends it at once with 0."""
    with stop_on_signals(exits=exits) as stop:
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
