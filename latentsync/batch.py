"""Many jobs, and long videos cut into segments, on a Ray cluster: ``python -m latentsync.batch JOBS.jsonl``.

Each line of JOBS is ``{"video": …, "audio": …, "output": …}`` plus any run option (``RunOptions`` names) and
``"segments"``. Workers are Ray actors that load the models once (one per GPU, or ``--workers`` on CPU) and take one
task at a time until none are left; the driver hands out tasks, resubmits those whose worker died, and writes one
JSON line per job to RESULTS. A job is a single task, or with segments: plan (face pass once) → N chunk ranges
rendered on N workers at once → finish (join, mux the user's audio once).

Outputs appear only by rename from a per-job work folder beside them, and a re-run skips an output only when it is
a finished mp4 (its boxes span the whole file and it probes with video and audio), so a file left by a killed
worker never counts as done.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from latentsync.errors import InputError, LatentSyncError, ResourceError
from latentsync.options import RunOptions

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # tries of one task whose worker died (killed, out of memory) before its job fails
MAX_RESTARTS = 4  # restarts of one worker (each reloads the models) before it is given up
CONNECT_TIMEOUT_S = 10.0
JOB_FIELDS = ("video", "audio", "output")
WORK_SUFFIX = ".latentsync-work"  # the per-job folder beside an output: temporary outputs and segment parts


@dataclass(frozen=True)
class Job:
    """One line of the jobs file, checked: absolute paths, validated options and the number of segments."""

    line: int
    video: Path
    audio: Path
    output: Path
    options: RunOptions
    segments: int = 1

    @property
    def work_dir(self) -> Path:
        """Beside the output (same file system, so the final rename is atomic); removed when the job ends."""
        return self.output.with_name(f".{self.output.name}{WORK_SUFFIX}")


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker needs to load the models; the environment is already resolved (entry point's job)."""

    weights_dir: Path | None  # None: each node fills its default weights folder from the network
    version: str
    manifest: tuple = ()  # the parsed WeightFile lines, so nodes need no copy of the manifest file
    download: dict[str, Any] = field(default_factory=dict)  # ensure_weights' endpoint / cache_home, when set
    unet_config: Path | None = None
    syncnet_config: Path | None = None
    device: str | None = None
    dtype: str | None = None
    compile: bool = False
    caps: Any = None  # media.MediaCaps read from the environment by the entry point
    temp_name: str | None = None  # folder in each node's temporary directory holding one folder per worker

    def weights(self) -> Path:
        """Verify (a named folder) or fill (the default one) this node's weights; returns the folder."""
        from latentsync.download import ensure_weights

        try:
            return ensure_weights(list(self.manifest), self.weights_dir, self.version, **self.download)
        except RuntimeError as e:  # the network, not the input
            raise ResourceError(_one_line(e)) from None


# ------------------------------------------------------------------------------------------------ jobs and results
def read_jobs(path: Path, segments: int = 1) -> tuple[list[Job], list[dict[str, Any]]]:
    """Parse a jobs file: the good jobs, and a failed result line for each bad one (the others still run)."""
    if not path.is_file():
        raise InputError(f"jobs file {path} does not exist")
    jobs: list[Job] = []
    failed: list[dict[str, Any]] = []
    outputs: dict[Path, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as e:
            failed.append(result_line(number, None, None, "failed", f"line {number} is not JSON ({e.msg})"))
            continue
        if not isinstance(entry, dict):
            failed.append(result_line(number, None, None, "failed", f"line {number} is not a JSON object"))
            continue
        try:
            job = _job(number, entry, segments)
            if job.output in outputs:
                raise InputError(f"output {job.output} is also the output of line {outputs[job.output]}")
            outputs[job.output] = number
            jobs.append(job)
        except InputError as e:
            failed.append(result_line(number, entry.get("video"), entry.get("output"), "failed", str(e)))
    if not jobs and not failed:
        raise InputError(f"jobs file {path} has no jobs")
    return jobs, failed


def _job(number: int, entry: dict[str, Any], segments: int) -> Job:
    missing = [name for name in JOB_FIELDS if not isinstance(entry.get(name), str) or not entry[name]]
    if missing:
        raise InputError(f"line {number} needs {', '.join(repr(m) for m in missing)} (a path)")
    options = {k: v for k, v in entry.items() if k not in JOB_FIELDS and k != "segments"}
    video, audio, output = (Path(entry[name]).expanduser().resolve() for name in JOB_FIELDS)
    if output in (video, audio):
        raise InputError(f"output {output} is an input of the same job; choose another output path")
    count = entry.get("segments", segments)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"segments must be a whole number of at least 1, got {count!r}")
    # Same validation and messages as the CLI and the Python API.
    return Job(number, video, audio, output, RunOptions.make(options).with_seed(), count)


def result_line(line: int, video: Any, output: Any, status: str, error: str | None = None, **fields: Any) -> dict:
    """One RESULTS line: where, what happened, and (on success) seed, frames, wall seconds and sync score."""
    return {"line": line, "video": None if video is None else str(video),
            "output": None if output is None else str(output), "status": status, "error": error,
            "seed": fields.get("seed"), "frames": fields.get("frames"), "seconds": fields.get("seconds"),
            "sync": fields.get("sync")}


def is_complete(path: Path) -> bool:
    """A finished output: a probe finds video and audio in it and, for MP4/MOV, its top-level boxes tile the whole
    file (a cut-off write does not). Outputs only ever appear by rename, so this is the second line of defence."""
    from latentsync import video as video_mod

    if not path.is_file():
        return False
    with path.open("rb") as f:
        iso = f.read(8)[4:] == b"ftyp"
    if iso and not _boxes_complete(path):
        return False
    try:
        # No input caps here: an output may rightly outlast them (a short video looped over long audio).
        info = video_mod.probe(path, max_side=2**31, max_duration=math.inf)
    except InputError:
        return False
    return info.has_audio and info.frame_count > 0


def _boxes_complete(path: Path) -> bool:
    """The ISO-BMFF box walk: ftyp, moov and mdat present, and the last box ends exactly at the end of the file."""
    size = path.stat().st_size
    seen = set()
    with path.open("rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            head = f.read(16)
            if len(head) < 8:
                return False
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if length == 1:  # 64-bit size follows the type
                if len(head) < 16:
                    return False
                length = int.from_bytes(head[8:16], "big")
            elif length == 0:  # "to the end of the file": what a writer leaves before it finalises
                return False
            if length < 8:
                return False
            seen.add(kind)
            pos += length
    return pos == size and {b"ftyp", b"moov", b"mdat"} <= seen


def _sync_fields(sync: Any) -> dict[str, Any] | None:
    if sync is None:
        return None
    return {"offset0_cosine": round(float(sync.offset0_cosine), 4), "best_offset": int(sync.best_offset),
            "confidence": round(float(sync.confidence), 4), "windows": int(sync.windows)}


def _one_line(error: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _message(error: BaseException) -> str:
    """What a job's ``error`` says: the user's one-line message, or for our own bugs the type too, so that they are
    not mistaken for a problem with the input."""
    return _one_line(error) if isinstance(error, LatentSyncError) else \
        f"internal error ({type(error).__name__}): {_one_line(error)}"


def _remove_work_dir(job: Job) -> None:
    """Remove the job's work folder (ours by name): temporary outputs and parts of a failed or killed attempt."""
    if job.work_dir.is_dir():
        shutil.rmtree(job.work_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the worker (an actor)
class Worker:
    """Loads the models once, then runs whole jobs or the plan / render / finish steps of segmented ones."""

    def __init__(self, config: WorkerConfig, rank: int):
        self.error: tuple[str, str] | None = None
        self.tmp: Path | None = None
        if config.temp_name is not None:
            # A restarted worker gets the same folder: what its killed predecessor left there goes now.
            self.tmp = Path(tempfile.gettempdir()) / config.temp_name / f"worker-{rank}"
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
            tempfile.tempdir = str(self.tmp)  # the pipeline's own TemporaryDirectory()s go there
        try:
            from latentsync.pipeline import LipSync

            self.pipe = LipSync.from_pretrained(config.weights(), version=config.version, device=config.device,
                                                dtype=config.dtype, unet_config=config.unet_config,
                                                syncnet_config=config.syncnet_config, compile=config.compile,
                                                caps=config.caps)
        except Exception as e:  # reported by ready(), so the driver can exit with the CLI's status
            self.error = ("input" if isinstance(e, InputError) else "resource", _message(e))

    def ready(self) -> dict[str, Any]:
        """This worker's process id, or why it could not load the models."""
        return {"pid": os.getpid(), "error": self.error}

    def run(self, job: Job) -> dict[str, Any]:
        """Lip-sync one whole job; the output appears by rename only once it is finished."""
        started = time.perf_counter()
        try:
            job.work_dir.mkdir(parents=True, exist_ok=True)
            temp_out = job.work_dir / job.output.name
            result = self.pipe.lipsync(job.video, job.audio, temp_out, job.options)
            os.replace(temp_out, job.output)
        except Exception as e:  # one bad job fails alone; the message is the one the CLI would print
            return _failure(e)
        return _success(result, started)

    def plan(self, job: Job) -> tuple[dict[str, Any], Any]:
        """Plan a segmented job (the face pass runs here, once for the whole video); the plan stays in Ray's
        object store for the renders."""
        try:
            plan = self.pipe.plan(job.video, job.audio, job.options)
        except Exception as e:
            return _failure(e), None
        return {"error": None, "num_chunks": plan.num_chunks}, plan

    def render(self, job: Job, plan: Any, index: int, chunks: range) -> dict[str, Any]:
        """Render output chunks ``chunks`` of the plan into part ``index`` of the job's work folder."""
        try:
            job.work_dir.mkdir(parents=True, exist_ok=True)
            part = self.pipe.render(plan, job.work_dir / f"part-{index:03d}.mp4", chunks)
        except Exception as e:
            return _failure(e)
        return {"error": None, "part": part}

    def finish(self, job: Job, plan: Any, parts: list[Any]) -> dict[str, Any]:
        """Join the parts, mux the user's audio once, score the sync; the output appears by rename."""
        started = time.perf_counter()
        try:
            temp_out = job.work_dir / job.output.name
            result = self.pipe.finish(plan, [part.path for part in parts], temp_out, parts)
            os.replace(temp_out, job.output)
        except Exception as e:
            return _failure(e)
        return _success(result, started)

    def close(self) -> None:
        """Remove this worker's temporary folder."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _failure(error: Exception) -> dict[str, Any]:
    """A failed task's answer; our own bugs also leave their traceback in the worker's log."""
    if not isinstance(error, LatentSyncError):
        log.error("internal error in a worker", exc_info=error)
    return {"error": _message(error)}


def _success(result: Any, started: float) -> dict[str, Any]:
    return {"error": None, "seed": result.seed, "frames": result.frames,
            "seconds": round(time.perf_counter() - started, 3), "sync": _sync_fields(result.sync)}


# ------------------------------------------------------------------------------------------------ the driver
@dataclass
class _Task:
    """One call to hand to a worker: a whole job ("run"), or one step of a segmented job."""

    kind: str
    job: Job
    args: tuple = ()
    attempts: int = 0


@dataclass
class _Segmented:
    """Driver-side state of one segmented job between its plan and its finish."""

    plan: Any = None  # an ObjectRef: the plan stays in the object store, the renders read it from there
    ranges: list[range] = field(default_factory=list)
    parts: dict[int, Any] = field(default_factory=dict)  # part index → RenderPart


def split_chunks(num_chunks: int, segments: int) -> list[range]:
    """``segments`` contiguous chunk ranges of near-equal length (fewer when there are fewer chunks)."""
    n = max(1, min(segments, num_chunks))
    bounds = [round(i * num_chunks / n) for i in range(n + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


class Batch:
    """A pool of workers on the connected Ray cluster and the loop that hands them tasks."""

    def __init__(self, config: WorkerConfig, workers: int, *, resources: dict[str, float] | None = None):
        actor = ray.remote(Worker).options(max_restarts=MAX_RESTARTS, max_task_retries=0, **(resources or {}))
        self.handles = [actor.remote(config, rank) for rank in range(workers)]
        self.pids: dict[int, int] = {}
        self._closed = False
        try:
            states = ray.get([h.ready.remote() for h in self.handles])
        except RayActorError as e:
            self.close(graceful=False)
            raise ResourceError(f"a worker could not start: {_one_line(e)}") from None
        for rank, state in enumerate(states):
            if state["error"]:
                kind, message = state["error"]
                self.close()
                raise (InputError if kind == "input" else ResourceError)(message)
            self.pids[rank] = state["pid"]

    def close(self, *, graceful: bool = True) -> None:
        """Stop every worker; ``graceful``: idle ones first remove their temporary folders (a killed one cannot,
        and the driver removes the local ones)."""
        if self._closed:
            return
        self._closed = True
        if graceful:
            try:
                ray.get([h.close.remote() for h in self.handles], timeout=60)
            except Exception:  # a dead or stuck worker has nothing left to say; it is killed below
                pass
        for h in self.handles:
            ray.kill(h, no_restart=True)

    def run(self, jobs: list[Job], report: Callable[[dict[str, Any]], None],
            on_dispatch: Callable[[_Task, int], None] | None = None) -> None:
        """Run every job, calling ``report`` with its result line as it ends. ``on_dispatch(task, worker_pid)``
        is called after each hand-out (tests kill workers there)."""
        for job in jobs:
            _remove_work_dir(job)  # left by an earlier run that was killed
        run = _Run(self, jobs, report, on_dispatch)
        try:
            run.loop()
        finally:
            if run.inflight:  # interrupted (Ctrl-C) or failed: stop the workers before removing what they write
                self.close(graceful=False)
                for task, _ in run.inflight.values():
                    if task is not None:
                        _remove_work_dir(task.job)


class _Run:
    """One pass of a batch: the queue of tasks, the idle workers, what is out, and each segmented job's state."""

    def __init__(self, batch: Batch, jobs: list[Job], report: Callable[[dict[str, Any]], None],
                 on_dispatch: Callable[[_Task, int], None] | None):
        self.batch, self.report, self.on_dispatch = batch, report, on_dispatch
        self.pending: deque[_Task] = deque(_Task("plan" if j.segments > 1 else "run", j) for j in jobs)
        self.idle = list(range(len(batch.handles)))
        self.inflight: dict[Any, tuple[_Task | None, int]] = {}  # ref → (task, rank); None: a restart check
        self.segmented: dict[int, _Segmented] = {}
        self.ended: set[int] = set()  # jobs reported; a sibling segment still out is ignored when it returns
        self.started: dict[int, float] = {}

    def loop(self) -> None:
        """Hand tasks to idle workers and take their answers until every job has ended."""
        while self.pending or self.inflight:
            self._dispatch()
            if not self.pending and all(t is None for t, _ in self.inflight.values()):
                break  # only restarting workers are out, and nothing is left for them
            [ref], _ = ray.wait(list(self.inflight), num_returns=1)
            task, rank = self.inflight.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError as e:
                self._died(task, rank, e)
                continue
            self.idle.append(rank)
            if task is None:
                self.batch.pids[rank] = value["pid"]
            elif task.job.line in self.ended:  # a sibling segment already failed this job
                self._tidy(task.job)
            else:
                # A job's next steps go first, so its segments run at once on the idle workers.
                self.pending.extendleft(reversed(self._next(task, value)))

    def _dispatch(self) -> None:
        while self.pending and self.idle:
            task = self.pending.popleft()
            if task.job.line in self.ended:
                continue
            rank = self.idle.pop(0)
            self.started.setdefault(task.job.line, time.perf_counter())
            self.inflight[self._submit(task, rank)] = (task, rank)
            if self.on_dispatch is not None:
                self.on_dispatch(task, self.batch.pids[rank])

    def _submit(self, task: _Task, rank: int):
        """Hand ``task`` to worker ``rank``; returns the reference to wait on."""
        handle, job = self.batch.handles[rank], task.job
        if task.kind == "run":
            return handle.run.remote(job)
        if task.kind == "plan":
            info, plan = handle.plan.options(num_returns=2).remote(job)
            self.segmented.setdefault(job.line, _Segmented()).plan = plan
            return info
        state = self.segmented[job.line]
        if task.kind == "render":
            index, chunks = task.args
            return handle.render.remote(job, state.plan, index, chunks)
        if task.kind == "finish":
            return handle.finish.remote(job, state.plan, [state.parts[i] for i in sorted(state.parts)])
        raise AssertionError(f"unknown task kind {task.kind!r}")

    def _next(self, task: _Task, value: dict[str, Any]) -> list[_Task]:
        """Take a task's answer; returns the tasks it makes ready (the renders after a plan, the finish after the
        last render)."""
        job = task.job
        if value.get("error"):
            self._end(job, value["error"])
            return []
        if task.kind == "plan":
            state = self.segmented[job.line]
            state.ranges = split_chunks(value["num_chunks"], job.segments)
            return [_Task("render", job, (i, r)) for i, r in enumerate(state.ranges)]
        if task.kind == "render":
            state = self.segmented[job.line]
            state.parts[task.args[0]] = value["part"]
            return [_Task("finish", job)] if len(state.parts) == len(state.ranges) else []
        fields = {k: v for k, v in value.items() if k != "error"}
        self._end(job, None, **{**fields, "seconds": round(time.perf_counter() - self.started[job.line], 3)})
        return []

    def _died(self, task: _Task | None, rank: int, error: RayActorError) -> None:
        """Worker ``rank`` died running ``task`` (None: while restarting): retry the task, wait for the restart."""
        handle = self.batch.handles[rank]
        if task is None:
            if isinstance(error, ActorUnavailableError):  # still restarting: ask again
                self.inflight[handle.ready.remote()] = (None, rank)
                return
            log.warning("worker %d could not be restarted; %d left", rank, len(self.idle) + len(self.inflight))
            if not self.idle and not self.inflight:  # its restarts are used up, and it was the last one
                for t in self.pending:
                    if t.job.line not in self.ended:
                        self._end(t.job, "every worker died; no worker is left to run it")
                self.pending.clear()
            return
        task.attempts += 1
        log.warning("worker %d died during %s of line %d (try %d of %d)", rank, task.kind, task.job.line,
                    task.attempts, MAX_ATTEMPTS)
        if task.job.line in self.ended:
            self._tidy(task.job)
        elif task.attempts >= MAX_ATTEMPTS:
            self._end(task.job, f"the worker running it died {task.attempts} times (killed, or out of memory?)")
        else:
            self.pending.appendleft(task)  # to the first idle worker, this one included once restarted
        # Ray restarts the actor (reloading the models); its new pid comes back before it is used again.
        self.inflight[handle.ready.remote()] = (None, rank)

    def _end(self, job: Job, error: str | None, **fields: Any) -> None:
        self.ended.add(job.line)
        self.segmented.pop(job.line, None)
        self._tidy(job)
        self.report(result_line(job.line, job.video, job.output, "failed" if error else "succeeded", error,
                                **fields))

    def _tidy(self, job: Job) -> None:
        # The work folder goes once no task of the job can still write into it.
        if not any(t is not None and t.job.line == job.line for t, _ in self.inflight.values()):
            _remove_work_dir(job)


# ------------------------------------------------------------------------------------------------ the entry point
@contextmanager
def connect(address: str | None, *, verbose: bool = False) -> Iterator[bool]:
    """Join the cluster at ``address``, reuse the Ray this process already joined, or start a local one that stops
    with the command (also on Ctrl-C); yields whether the cluster is ours."""
    if ray.is_initialized():
        yield False
        return
    if address is not None:
        _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ResourceError(f"could not {'join the Ray cluster at ' + address if address else 'start Ray'}: "
                            f"{_one_line(e)}") from None
    # ray.init installed its own SIGTERM handler (exit at once); ours unwinds like Ctrl-C, cleaning up on the way.
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        yield address is None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        ray.shutdown()  # stops the local cluster's processes when we started it; only disconnects otherwise


# The signal that stopped the run: Ray's wait turns whatever the handler raises into a plain KeyboardInterrupt.
_received: list[int] = []


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM, handled as Ctrl-C is."""
    _received.append(signum)
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _check_reachable(address: str) -> None:
    """Fail in seconds on a ``host:port`` nobody answers at (Ray itself keeps retrying for minutes)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ResourceError(f"no Ray cluster answers at {address} ({e.strerror or e}); is `ray start --head` "
                            "running there?") from None


def plan_workers(workers: int | None, device: str | None) -> tuple[int, dict[str, float]]:
    """How many workers, and the Ray resources of each: a GPU each where the cluster has GPUs and the device
    allows, else an equal share of the CPUs (Ray sets each worker's thread count from it)."""
    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), int(total.get("CPU", 1))
    use_gpu = gpus > 0 and not (device or "").startswith("cpu")
    if device and device.startswith("cuda") and gpus == 0:
        raise ResourceError("--device cuda was asked for, but the Ray cluster has no GPU")
    n = workers or (gpus if use_gpu else 1)
    if use_gpu:  # more workers than GPUs share them (Ray's fractional GPUs): allowed, but not faster
        return n, {"num_gpus": 1 if n <= gpus else round(gpus / n, 4), "num_cpus": 1}
    return n, {"num_cpus": cpus // n if n <= cpus else round(cpus / n, 4)}


def build_parser() -> argparse.ArgumentParser:
    """The batch command's flags; the model flags are the CLI's own (same help, same environment defaults)."""
    from latentsync import cli

    p = argparse.ArgumentParser(prog="python -m latentsync.batch",
                                description="Lip-sync every job of a JSON-lines file on a Ray cluster.")
    p.add_argument("jobs", type=Path, help='JSON lines: {"video": …, "audio": …, "output": …, option: value, …}')
    p.add_argument("--results", type=Path, required=True, help="JSON lines written here, one per job")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (ray://host:10001, or auto); default: start a local one")
    p.add_argument("--workers", type=int, default=None,
                   help="workers, each with its own models (default: one per GPU, else 1)")
    p.add_argument("--segments", type=int, default=1,
                   help="cut each video into N parts rendered at once (a job's \"segments\" overrides it)")
    # Borrowed from the CLI's parser rather than re-typed, so the two cannot drift apart.
    for action in cli.build_parser()._actions:
        if action.dest in ("weights_dir", "version", "unet_config", "syncnet_config", "device", "dtype", "compile"):
            p._add_action(action)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--verbose", action="store_true", help="show the workers' own logs")
    return p


def main(argv: list[str] | None = None, *, on_dispatch: Callable[[_Task, int], None] | None = None) -> int:
    """Run a batch; exit status 0 when every job succeeded or was skipped, 1 otherwise, 2 on a bad command."""
    args = build_parser().parse_args(argv)
    _received.clear()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.workers is not None and args.workers < 1:
            raise InputError(f"--workers must be at least 1, got {args.workers}")
        if args.segments < 1:
            raise InputError(f"--segments must be at least 1, got {args.segments}")
        config = worker_config(args)
        jobs, bad = read_jobs(args.jobs, args.segments)
        return _run(args, config, jobs, bad, on_dispatch)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ResourceError as e:  # the machine or the network, not the input
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        signum = _received[-1] if _received else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(signum).name}; the workers were stopped, finished outputs "
              "are kept and a re-run skips them", file=sys.stderr)
        return 128 + signum


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    """The workers' settings from the command line and, as the CLI reads them, the ``LATENTSYNC_*`` variables
    (and ``HF_ENDPOINT`` / ``XDG_CACHE_HOME`` for the download), resolved here once for every node."""
    from latentsync import cli, media
    from latentsync.manifest import read_manifest

    named = args.weights_dir or os.environ.get("LATENTSYNC_WEIGHTS_DIR")
    configs = {}
    for name, variable in (("unet_config", "LATENTSYNC_UNET_CONFIG"), ("syncnet_config", "LATENTSYNC_SYNCNET_CONFIG")):
        found = cli._config_file(f"--{name.replace('_', '-')}", getattr(args, name), variable)
        configs[name] = found.resolve() if found else None
    download = {k: v for k, v in (("endpoint", os.environ.get("HF_ENDPOINT")),
                                  ("cache_home", os.environ.get("XDG_CACHE_HOME"))) if v}
    return WorkerConfig(Path(named).expanduser().resolve() if named else None, args.version,
                        tuple(read_manifest(os.environ.get("LATENTSYNC_MANIFEST") or None)), download,
                        device=args.device, dtype=args.dtype, compile=args.compile,
                        caps=media.caps_from_env(os.environ), **configs)


def _run(args: argparse.Namespace, config: WorkerConfig, jobs: list[Job], bad: list[dict[str, Any]],
         on_dispatch: Callable[[_Task, int], None] | None) -> int:
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not is_complete(j.output)]
    skipped = [j for j in jobs if j not in todo]
    counts: Counter[str] = Counter()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("w") as results, \
            tqdm(total=len(jobs) + len(bad), unit="job", desc="jobs", disable=args.quiet) as bar:

        lines: list[dict[str, Any]] = []

        def report(line: dict[str, Any]) -> None:
            lines.append(line)
            results.write(json.dumps(line) + "\n")
            results.flush()
            counts[line["status"]] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
            if line["status"] == "failed":
                log.warning("line %s failed: %s", line["line"], line["error"])

        for line in bad:
            report(line)
        for job in skipped:
            report(result_line(job.line, job.video, job.output, "skipped"))
        if todo:
            with connect(args.address, verbose=args.verbose) as local, \
                    tempfile.TemporaryDirectory(prefix="latentsync-batch-") as tmp:
                if local:  # verify or fetch the weights once here, not in every worker at once
                    config.weights()
                workers, resources = plan_workers(args.workers, args.device)
                batch = Batch(dataclasses.replace(config, temp_name=Path(tmp).name), workers, resources=resources)
                try:
                    batch.run(todo, report, on_dispatch)
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every job still gets its line, so RESULTS says
                    # what a re-run will do
                    done = {line["line"] for line in lines}
                    for job in todo:
                        if job.line not in done:
                            report(result_line(job.line, job.video, job.output, "failed",
                                               "interrupted (Ctrl-C or SIGTERM) before it finished"))
                    raise
                finally:
                    batch.close()
    print(f"{counts['succeeded']} succeeded, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"results in {args.results}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
