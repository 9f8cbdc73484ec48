"""The batch worker, a Ray actor: loads the models once, then runs whole jobs or the plan / render / finish steps
of segmented ones, one task at a time.

Every answer is a dict carrying the worker's process id (it changes when Ray restarts the actor) and ``error``: a
task never raises for a bad job, so one bad job fails alone and its message is the one the CLI would print. While a
task runs, its progress lines (the stages, then percent and ETA) go to the driver's status board, when it has one.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from latentsync.batch.folders import remove_stale
from latentsync.batch.jobs import Job
from latentsync.errors import InputError, describe, one_line
from latentsync.progress import LogLines, Progress
from latentsync.result import LipSyncResult, metrics
from latentsync.settings import Settings

log = logging.getLogger(__name__)

BATCH_PREFIX = "latentsync-batch"  # a worker's folder: BATCH_PREFIX-RUN-RANK-PID in its node's temporary folder


class Worker:
    """One worker: ``settings`` say how to load the models; its temporary files go to ``TEMP_NAME-RANK-PID`` in its
    node's temporary folder (``temp_name`` None: the pipeline's default temporary folders); ``board``: the driver's
    status board (an actor with ``post(line, text)``) that hears each task's progress lines, or None."""

    def __init__(self, settings: Settings, rank: int, temp_name: str | None = None, board: Any = None):
        self.error: tuple[str, str] | None = None
        self.board = board
        self.tmp: Path | None = None
        if temp_name is not None:
            # The folder ends in this process's id: a later worker on this node removes it once the process is
            # gone (killed with its driver); what a restarted worker's killed predecessor left goes now.
            root = Path(tempfile.gettempdir())
            remove_stale(root, BATCH_PREFIX)
            self.tmp = root / f"{temp_name}-{rank}-{os.getpid()}"
            for folder in root.glob(f"{glob.escape(temp_name)}-{rank}-*"):
                shutil.rmtree(folder, ignore_errors=True)
            self.tmp.mkdir()
            tempfile.tempdir = str(self.tmp)  # the pipeline's own TemporaryDirectory()s go there
        # Segments of one video are rendered by several workers and joined: the same frames wherever they render
        # (with the same GPU model and software stack; cuDNN and cuBLAS pick kernels by the GPU's SM count).
        from latentsync.devices import make_deterministic  # here: the batch command's checks run without torch

        make_deterministic()
        try:
            self.pipe = settings.load()
        except Exception as e:  # reported by ready(), so the driver can exit with the CLI's status
            self.error = ("input" if isinstance(e, InputError) else "resource", message(e))

    def ready(self) -> dict[str, Any]:
        """This worker's process id, or why it could not load the models."""
        return {"pid": os.getpid(), "error": self.error}

    def run(self, job: Job) -> dict[str, Any]:
        """Lip-sync one whole job; the output appears by rename only once it is finished."""
        started = time.perf_counter()
        try:
            job.work_dir.mkdir(parents=True, exist_ok=True)
            temp_out = job.work_dir / job.output.name
            result = self.pipe.lipsync(job.video, job.audio, temp_out, job.options, progress=self._progress(job))
            os.replace(temp_out, job.output)
        except Exception as e:
            return _failure(e)
        return _success(result, started)

    def plan(self, job: Job) -> tuple[dict[str, Any], Any]:
        """Plan a segmented job (the face pass runs here, once for the whole video); the plan stays in Ray's
        object store for the renders."""
        try:
            plan = self.pipe.plan(job.video, job.audio, job.options, progress=self._progress(job))
        except Exception as e:
            return _failure(e), None
        edited = [c for c in range(plan.num_chunks) if plan.edited(c)]  # with time ranges, the chunks that cost
        return {"pid": os.getpid(), "error": None, "num_chunks": plan.num_chunks, "edited": edited}, plan

    def render(self, job: Job, plan: Any, index: int, chunks: range) -> dict[str, Any]:
        """Render output chunks ``chunks`` of the plan into part ``index`` of the job's work folder."""
        try:
            job.work_dir.mkdir(parents=True, exist_ok=True)
            part = self.pipe.render(plan, job.work_dir / f"part-{index:03d}.mp4", chunks,
                                    progress=self._progress(job, f"part {index + 1}: "))
        except Exception as e:
            return _failure(e)
        return {"pid": os.getpid(), "error": None, "part": part}

    def finish(self, job: Job, plan: Any, parts: list[Any]) -> dict[str, Any]:
        """Join the parts, mux the user's audio once, score the sync; the output appears by rename."""
        started = time.perf_counter()
        try:
            temp_out = job.work_dir / job.output.name
            result = self.pipe.finish(plan, parts, temp_out, progress=self._progress(job))
            os.replace(temp_out, job.output)
        except Exception as e:
            return _failure(e)
        return _success(result, started)

    def _progress(self, job: Job, label: str = "") -> Progress | bool:
        """The task's progress, as lines posted to the board under the job's line number (none without a board).
        Posting does not wait for the driver."""
        if self.board is None:
            return False
        return Progress(LogLines(lambda text: self.board.post.remote(job.line, label + text)))

    def close(self) -> None:
        """Remove this worker's temporary folder."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def sweep(temp_name: str) -> None:
    """Remove every worker folder ``TEMP_NAME-*`` from this node's temporary folder (a Ray task, run on each node
    once the workers of a batch are gone)."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{glob.escape(temp_name)}-*"):
        shutil.rmtree(folder, ignore_errors=True)
    remove_stale(root, BATCH_PREFIX)


def message(error: BaseException) -> str:
    """What a job's ``error`` says: the CLI's one line (out of memory, a full disk, a bad input, ...), or for our
    own bugs the type too, so that they are not mistaken for a problem with the input."""
    described = describe(error)
    return described[1] if described is not None else f"internal error ({type(error).__name__}): {one_line(error)}"


def _failure(error: Exception) -> dict[str, Any]:
    """A failed task's answer; our own bugs also leave their traceback in the worker's log."""
    if describe(error) is None:
        log.error("internal error in a worker", exc_info=error)
    return {"pid": os.getpid(), "error": message(error)}


def _success(result: LipSyncResult, started: float) -> dict[str, Any]:
    """A finished job's answer: the result's figures, with the task's wall seconds for ``seconds``."""
    figures = metrics(result)
    return {"pid": os.getpid(), "error": None, "seed": figures["seed"], "frames": figures["frames"],
            "seconds": round(time.perf_counter() - started, 3), "sync": figures["sync"], "ranges": figures["ranges"]}
