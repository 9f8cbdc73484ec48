"""Running the synthesis stages: one after another (serial), or each in its own thread joined by bounded queues.

Every stage is a callable taking the previous stage's item. Concurrently, a chunk is fetched while the one before
it is on the GPU and the one before that is pasted back and encoded; torch and ffmpeg release the GIL, so the
threads overlap for real. The first error in any stage stops every stage and is raised to the caller unchanged.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, wait
from typing import Any

import torch

from latentsync.control import Cancel, check_cancel

QUEUE_DEPTH = 2  # items waiting between two stages: memory stays flat in video length
_POLL_S = 0.05  # how often a blocked stage looks whether another one failed

_DONE = object()


def run_stages(items: Iterable[Any], stages: list[Callable[[Any], Any]], *, concurrent: bool,
               cancel: Cancel | None = None, homes: dict[int, Any] | None = None) -> None:
    """Push every item through ``stages`` in order (each stage's result feeds the next; the last one's is dropped).

    ``cancel`` is checked before each item is taken. Concurrently, every stage runs in its own thread (with
    inference mode on, which is per thread) and the caller waits; nothing of the run survives its return.
    ``homes[k]`` (a ``GpuThread``) runs stage ``k`` on that long-lived thread instead of a fresh one, in both modes.
    """
    homes = homes or {}
    if not concurrent:
        calls = [_at_home(s, homes[k]) if k in homes else s for k, s in enumerate(stages)]
        with torch.inference_mode():
            for item in items:
                check_cancel(cancel)
                for stage in calls:
                    item = stage(item)
        return

    failed = threading.Event()
    errors: list[BaseException] = []
    queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=QUEUE_DEPTH) for _ in stages[1:]]

    def put(q: queue.Queue, item: Any) -> bool:
        while not failed.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def source() -> Iterable[Any]:
        it = iter(items)
        # Looked at before each item is made: a stage failed, or the caller was interrupted (maybe before this
        # thread began), and the caller's cleanup may be closing what the items are made from.
        while not failed.is_set():
            try:
                item = next(it)
            except StopIteration:
                return
            check_cancel(cancel)
            yield item

    def inbox(q: queue.Queue) -> Iterable[Any]:
        while not failed.is_set():
            try:
                item = q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            yield item

    def worker(k: int) -> None:
        try:
            work(k)
        finally:
            done[k].set()

    def work(k: int) -> None:
        try:
            with torch.inference_mode():
                for item in source() if k == 0 else inbox(queues[k - 1]):
                    out = stages[k](item)
                    if k < len(queues) and not put(queues[k], out):
                        return
                if k < len(queues):
                    put(queues[k], _DONE)
        except BaseException as exc:  # noqa: BLE001 — handed to the caller's thread below
            if not failed.is_set():
                errors.append(exc)
            failed.set()

    threads = {k: threading.Thread(target=worker, args=(k,), name=f"latentsync-stage-{k}", daemon=True)
               for k in range(len(stages)) if k not in homes}
    # Each stage's own "ended" flag, not Thread.join: a join that an exception interrupts (Cog's cancel) may mark a
    # thread that is still running as stopped (CPython 3.11's bpo-45274 fix), and a later join then returns at once.
    done = {k: threading.Event() for k in range(len(stages))}
    queued: list[Future] = []
    try:
        # Started inside the try: a signal raised in this thread between two starts still stops the started ones.
        queued.extend(homes[k].submit(worker, k) for k in sorted(homes))
        for t in threads.values():
            t.start()
        for k in done:
            while not done[k].wait(_POLL_S):  # in slices: an exception raised in this thread from outside (Cog's
                pass  # cancel) lands within one, not once the stage ends
        while wait(queued, timeout=_POLL_S).not_done:
            pass
    except BaseException:  # KeyboardInterrupt (or a CLI signal) in the caller: stop the stages before leaving
        failed.set()
        for k, t in threads.items():
            if t.ident is not None:  # started; one never started does nothing should it start now
                done[k].wait()
        wait(queued)
        raise
    if errors:
        raise errors[0]


def _at_home(stage: Callable[[Any], Any], home: Any) -> Callable[[Any], Any]:
    """``stage`` run on its long-lived thread ``home`` (a ``GpuThread``)."""
    return lambda item: home.run(stage, item)
