"""Progress of a run, told once: which stage started, how many of its frames are done, when it ended.

A :class:`Progress` hands each change to its listeners: :class:`Bars` draws a tqdm bar per stage that counts frames
(the CLI's), :class:`LogLines` writes lines a person reads in a log (Cog's prediction logs, the batch command's
per-job status). The stages, in the order a run meets them: weights (verify or download, load), faces (pass 1),
synthesis (the output's chunks), encoding (join and mux), scoring (SyncNet, where it runs after synthesis). Faces
and synthesis overlap in every loop mode: the face pass runs just ahead of the chunks that need it (with
``cut_off`` and ``silence``, further ahead, until no output length still possible changes a chunk).

A stage that counts frames ends when its last frame is done, wherever the run's code ends it later (the face pass
is closed only when the run is), so its bar and its end line give that stage's own time and rate.
:class:`BarSafeHandler` writes log lines around the bars that are on screen instead of into them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm.auto import tqdm

from latentsync.control import Cancel

WEIGHTS, FACES, SYNTHESIS, ENCODING, SCORING = STAGES = ("weights", "faces", "synthesis", "encoding", "scoring")
EVERY_PERCENT = 10.0  # LogLines: a line each time another 10 % of a stage's frames is done,
EVERY_S = 30.0  # or once this many seconds have passed since the stage's last line, whichever comes first


class Listener:
    """What a listener of a :class:`Progress` hears; each method does nothing unless overridden. Calls come one at
    a time (under the progress's lock), from whichever thread made the change."""

    def started(self, stage: str, total: int | None) -> None:
        """``stage`` started; ``total`` frames (None: it counts none, or an unknown number)."""

    def advanced(self, stage: str, done: int, total: int | None) -> None:
        """``done`` frames of ``stage`` are done."""

    def ended(self, stage: str, done: int, failed: bool) -> None:
        """``stage`` ended after ``done`` frames; ``failed``: by an error or a cancel."""

    def tick(self) -> None:
        """Time passed (the run checked for a cancel); nothing else changed."""


class Progress:
    """Frames done per open stage of one run, told to ``listeners``; safe to call from the run's threads.

    A stage not (or no longer) open ignores ``advance`` and ``end``: progress never breaks a run.
    """

    def __init__(self, *listeners: Listener):
        self.listeners = listeners
        self._open: dict[str, list] = {}  # stage → [done, total]
        self._lock = threading.Lock()

    def start(self, stage: str, total: int | None = None) -> None:
        """``stage`` starts, with ``total`` frames to do (None: it counts none, or an unknown number)."""
        with self._lock:
            self._open[stage] = [0, total]
            for listener in self.listeners:
                listener.started(stage, total)

    def advance(self, stage: str, frames: int = 1) -> None:
        """``frames`` more frames of ``stage`` are done; the stage ends with its last one."""
        with self._lock:
            counts = self._open.get(stage)
            if counts is None:
                return
            counts[0] += frames
            for listener in self.listeners:
                listener.advanced(stage, counts[0], counts[1])
            if counts[1] is not None and counts[0] >= counts[1]:
                del self._open[stage]
                for listener in self.listeners:
                    listener.ended(stage, counts[0], False)

    def end(self, stage: str, *, failed: bool = False) -> None:
        """``stage`` ended (``failed``: by an error or a cancel); again, or for a stage never started: nothing."""
        with self._lock:
            counts = self._open.pop(stage, None)
            if counts is None:
                return
            for listener in self.listeners:
                listener.ended(stage, counts[0], failed)

    @contextmanager
    def stage(self, stage: str, total: int | None = None) -> Iterator[None]:
        """``stage`` for the duration of the block (failed when the block raises)."""
        self.start(stage, total)
        try:
            yield
        except BaseException:
            self.end(stage, failed=True)
            raise
        self.end(stage)

    def tick(self) -> None:
        """Let listeners that speak on a timer speak: called where the run checks for a cancel."""
        with self._lock:
            for listener in self.listeners:
                listener.tick()


class Watched:
    """A run's ``cancel`` (anything with ``is_set()``, or None: never) that lets ``progress`` speak on its timer each
    time the run checks it (between chunks and denoising steps), so a long stretch without a finished frame still
    gets its "still running" line."""

    def __init__(self, cancel: Cancel | None, progress: Progress):
        self.cancel, self.progress = cancel, progress

    def is_set(self) -> bool:
        self.progress.tick()
        return self.cancel is not None and bool(self.cancel.is_set())


def as_progress(progress: bool | Progress | None) -> Progress:
    """A run's progress from what the API takes: a :class:`Progress` as it is, True for tqdm bars on stderr,
    False or None for none."""
    if isinstance(progress, Progress):
        return progress
    return Progress(Bars()) if progress else Progress()


class Bars(Listener):
    """A tqdm bar for each stage with a frame total, closed when the stage ends; ``tqdm_args`` go to each bar
    (``file=``, ...)."""

    def __init__(self, **tqdm_args):
        self.tqdm_args = tqdm_args
        self._bars: dict[str, tqdm] = {}

    def started(self, stage: str, total: int | None) -> None:
        if total is not None:
            self._bars[stage] = tqdm(total=total, desc=stage, unit="frame", **self.tqdm_args)

    def advanced(self, stage: str, done: int, total: int | None) -> None:
        bar = self._bars.get(stage)
        if bar is not None:
            bar.update(done - bar.n)

    def ended(self, stage: str, done: int, failed: bool) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()


class BarSafeHandler(logging.StreamHandler):
    """A logging handler for a stream that bars may be drawn on: each line is written through tqdm, which clears
    the open bars, writes the line and draws them again below it, so no line lands in the middle of a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 — logging's own rule: a failed write is reported, never raised
            self.handleError(record)


@dataclass
class _Seen:
    """What :class:`LogLines` knows of an open stage."""

    started: float
    total: int | None
    done: int = 0
    step: int = 0  # how many ``every_percent`` steps of the total the last line had reached
    last: float = 0.0  # when the stage's last line was written


class LogLines(Listener):
    """Lines for a log a person reads, handed to ``emit``: each stage's name as it starts; then a line with the
    percent, frames done/total and an ETA each time another ``every_percent`` of its frames is done or
    ``every_s`` seconds have passed since its last line, whichever comes first; its time when it ends.

    ``clock`` (seconds, monotonic) is injectable so that tests need no sleeps.
    """

    def __init__(self, emit: Callable[[str], None], *, every_percent: float = EVERY_PERCENT,
                 every_s: float = EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.emit, self.every_percent, self.every_s, self.clock = emit, every_percent, every_s, clock
        self._open: dict[str, _Seen] = {}

    def started(self, stage: str, total: int | None) -> None:
        now = self.clock()
        self._open[stage] = _Seen(started=now, total=total, last=now)
        self.emit(f"{stage} started" + (f" ({total} frames)" if total is not None else ""))

    def advanced(self, stage: str, done: int, total: int | None) -> None:
        seen = self._open.get(stage)
        if seen is None:
            return
        seen.done, now = done, self.clock()
        step = int(done * 100 / total // self.every_percent) if total else 0
        # Reaching the total is left to the stage's end line, which says how long it took.
        if (total and step > seen.step and done < total) or now - seen.last >= self.every_s:
            seen.step = step
            self._line(stage, seen, now)

    def ended(self, stage: str, done: int, failed: bool) -> None:
        seen = self._open.pop(stage, None)
        if seen is None or failed:  # the error itself is reported by whoever catches it
            return
        frames = f" ({done} frames)" if done else ""
        self.emit(f"{stage} done in {clock_text(self.clock() - seen.started)}{frames}")

    def tick(self) -> None:
        now = self.clock()
        for stage, seen in self._open.items():
            if now - seen.last >= self.every_s:
                self._line(stage, seen, now)

    def _line(self, stage: str, seen: _Seen, now: float) -> None:
        seen.last = now
        elapsed = now - seen.started
        if not seen.total:
            frames = f" {seen.done} frames," if seen.done else ""
            self.emit(f"{stage}{frames} {clock_text(elapsed)} so far")
            return
        percent = min(100, seen.done * 100 // seen.total)
        eta = clock_text(elapsed * (seen.total - seen.done) / seen.done) if seen.done else "unknown"
        self.emit(f"{stage} {percent} % ({seen.done}/{seen.total} frames), ETA {eta}")


def clock_text(seconds: float) -> str:
    """Seconds as a person reads a duration: ``0:42``, ``12:03``, ``1:02:03``."""
    minutes, s = divmod(max(0, round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"
