"""The driver: starts the workers on the Ray cluster and hands them tasks until every job has ended.

A job is a single task (``run``), or with segments: ``plan`` (face pass once) → N ``render`` tasks on N workers at
once → ``finish`` (join, mux the user's audio once).

Ray restarts a killed worker by itself: each worker is an actor with ``max_restarts`` (reloading the models). The
task it was running is handed out again here, to whichever worker is idle first (up to :data:`MAX_ATTEMPTS` tries in
all): Ray's own ``max_task_retries`` would rerun it on the same actor, which never comes back when its node died. A
task's ``RayActorError`` comes once its process is gone, so nothing runs twice into the same work folder at once.

The hand-out itself stays here, because Ray has no primitive for it: actor tasks queue per actor when submitted
(``ActorPool`` too, and it does not survive a dead actor), while a task must go to whichever worker is idle first,
a job's next steps before other jobs' (so its segments run at once), and how many renders a plan makes is known only
once it has run.

While jobs run, each task's progress lines (``line 3: synthesis 40 % (160/400 frames), ETA 0:42``) reach the driver
through a small status board actor that the workers post to and the driver reads every :data:`STATUS_EVERY_S`.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from latentsync.batch import cluster
from latentsync.batch.jobs import Job, result_line
from latentsync.batch.worker import BATCH_PREFIX, Worker, sweep
from latentsync.errors import InputError, ResourceError, one_line
from latentsync.settings import Settings

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # tries of one task whose worker died (killed, out of memory) before its job fails
MAX_RESTARTS = 4  # restarts of one worker (each reloads the models) before it is given up
SWEEP_TIMEOUT_S = 30.0  # for stopped workers to be gone, and for each node to remove what they left
REVIVE_EVERY_S = 0.2  # how often to ask a restarting worker whether it is back
STATUS_EVERY_S = 1.0  # how often the driver prints what the workers posted (they post at most every 10 % or 30 s)


@dataclass
class Task:
    """One call to hand to a worker: a whole job ("run"), or one step of a segmented job."""

    kind: str
    job: Job
    args: tuple = ()
    tries: int = 0  # hand-outs so far


@dataclass
class _Segmented:
    """Driver-side state of one segmented job between its plan and its finish."""

    plan: Any = None  # an ObjectRef: the plan stays in the object store, the renders read it from there
    ranges: list[range] = field(default_factory=list)
    parts: dict[int, Any] = field(default_factory=dict)  # part index → RenderPart


def split_chunks(num_chunks: int, segments: int, edited: list[int] | None = None) -> list[range]:
    """``segments`` contiguous chunk ranges covering every chunk, each holding a near-equal share of the ``edited``
    chunks (default: all; fewer ranges when there are fewer): chunks outside a job's time ranges only pass their
    frames through, so they cost next to nothing and go with their neighbours."""
    edited = list(range(num_chunks)) if edited is None else edited
    n = max(1, min(segments, len(edited)))
    bounds = [0, *(edited[round(i * len(edited) / n)] for i in range(1, n)), num_chunks]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


class StatusBoard:
    """The workers' progress lines, kept until the driver takes them (an actor that needs no CPU)."""

    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []

    def post(self, line: int, text: str) -> None:
        """Job ``line`` says ``text``."""
        self.lines.append((line, text))

    def take(self) -> list[tuple[int, str]]:
        """Every line posted since the last call, in the order posted."""
        lines, self.lines = self.lines, []
        return lines


class Batch:
    """A pool of workers on the connected Ray cluster and the loop that hands them tasks. The workers are placed
    as one placement group (every worker, or a ``ResourceError`` after ``placement_timeout`` seconds saying what
    the cluster lacks); each keeps its temporary files in ``latentsync-batch-RUN-RANK-PID`` in its node's temporary
    folder, and nothing of them is left on any node once :meth:`close` returns. With ``status`` the workers'
    progress lines are logged per job as they come. ``local``: the cluster is a Ray this process started."""

    def __init__(self, settings: Settings, workers: int, *, resources: dict[str, float] | None = None,
                 placement_timeout: float, status: bool = False, local: bool = False):
        resources = resources or {"num_cpus": 1}
        self.temp_name = f"{BATCH_PREFIX}-{secrets.token_hex(4)}"
        self.handles: list[Any] = []
        self.pids: dict[int, int] = {}
        self.lost: set[int] = set()  # ranks whose worker did not come back (its node died): nothing to ask them
        self.placement_timeout = placement_timeout
        self.local = local  # a Ray started here: every node's temporary folder is this process's
        self._closed = False
        # ray types what .remote() makes as "the handle or the class" (for editors' completion): it is the handle
        self.board: ActorHandle[StatusBoard] | None = cast(
            "ActorHandle[StatusBoard]", ray.remote(StatusBoard).options(num_cpus=0).remote()) if status else None
        bundle = {name: resources[key] for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"))
                  if resources.get(key)}
        self.group = placement_group([bundle] * workers, strategy="SPREAD")
        try:
            try:
                cluster.get(self.group.ready(), timeout=placement_timeout)
            except GetTimeoutError:
                raise ResourceError(cluster.lacking(workers, bundle, placement_timeout)) from None
            actor = ray.remote(Worker)
            self.handles = [actor.options(
                max_restarts=MAX_RESTARTS, max_task_retries=0, **resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote(settings, rank, self.temp_name, self.board) for rank in range(workers)]
            states = cluster.get([h.ready.remote() for h in self.handles])
        except RayActorError as e:
            self.close(graceful=False)
            raise ResourceError(f"a worker could not start: {one_line(e)}") from None
        except BaseException:  # no placement, or Ctrl-C / SIGTERM while the workers load: nothing may stay behind
            self.close(graceful=False)
            raise
        for rank, state in enumerate(states):
            if state["error"]:
                kind, message = state["error"]
                self.close()
                raise (InputError if kind == "input" else ResourceError)(message)
            self.pids[rank] = state["pid"]

    def close(self, *, graceful: bool = True) -> None:
        """Stop every worker and free its place. ``graceful``: each first removes its temporary folder; a worker
        that cannot (killed, dead, stuck, or not ``graceful``) has its folder removed by a task on every node."""
        if self._closed:
            return
        self._closed = True
        tidy = False
        if graceful:
            try:
                ray.get([h.close.remote() for rank, h in enumerate(self.handles) if rank not in self.lost], timeout=60)
                tidy = not self.lost
            except Exception:  # a dead or stuck worker has nothing left to say; it is killed below
                pass
        for h in self.handles:
            ray.kill(h, no_restart=True)
        if self.handles and not tidy:
            self._sweep()
        remove_placement_group(self.group)
        if self.board is not None:
            ray.kill(self.board)

    def _sweep(self) -> None:
        """Remove this batch's worker folders from every node's temporary folder, once the workers are gone (a
        killed process cleans nothing up, and may have been writing a part until it died)."""
        for h in self.handles:
            try:
                ray.get(h.ready.remote(), timeout=SWEEP_TIMEOUT_S)  # answers with an error once the worker is dead
            except Exception:
                pass
        if self.local:  # no task (a worker process to start) for what this process can remove itself
            sweep(self.temp_name)
            return
        task = ray.remote(num_cpus=0)(sweep)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                .remote(self.temp_name) for node in ray.nodes() if node["Alive"]]
        try:
            ray.get(refs, timeout=SWEEP_TIMEOUT_S)
        except Exception as e:  # a node that went away took its folder with it, or is beyond reach
            log.warning("could not remove %s-* on every node: %s", self.temp_name, one_line(e))

    def show_status(self) -> None:
        """Log the progress lines the workers posted since the last call, each with its job's line number."""
        if self.board is None:
            return
        try:
            lines = ray.get(self.board.take.remote(), timeout=cluster.CONNECT_TIMEOUT_S)
        except RayError as e:  # a status is no reason to stop the jobs: they go on without one
            log.warning("no more progress lines: the status board failed (%s)", one_line(e))
            self.board = None
            return
        for line, text in lines:
            log.info("line %d: %s", line, text)

    def run(self, jobs: list[Job], report: Callable[[dict[str, Any]], None],
            on_dispatch: Callable[[Task, int], None] | None = None) -> None:
        """Run every job, calling ``report`` with its result line as it ends. ``on_dispatch(task, worker_pid)``
        is called after each hand-out (tests kill workers there)."""
        for job in jobs:
            job.remove_work_dir()  # left by an earlier run that was killed
        run = _Run(self, jobs, report, on_dispatch)
        try:
            run.loop()
            self.show_status()
        finally:
            if run.inflight:  # interrupted (Ctrl-C) or failed: stop the workers before removing what they write
                self.close(graceful=False)
                for task, _ in run.inflight.values():
                    task.job.remove_work_dir()


class _Run:
    """One pass of a batch: the queue of tasks, the idle workers, what is out, and each segmented job's state."""

    def __init__(self, batch: Batch, jobs: list[Job], report: Callable[[dict[str, Any]], None],
                 on_dispatch: Callable[[Task, int], None] | None):
        self.batch, self.report, self.on_dispatch = batch, report, on_dispatch
        self.pending: deque[Task] = deque(Task("plan" if j.segments > 1 else "run", j) for j in jobs)
        self.idle = list(range(len(batch.handles)))
        self.inflight: dict[Any, tuple[Task, int]] = {}  # ref → (task, rank)
        self.reviving: dict[Any, int] = {}  # ref of ready() → rank of a worker that died, until Ray restarted it
        self.segmented: dict[int, _Segmented] = {}
        self.ended: set[int] = set()  # jobs reported; a sibling segment still out is ignored when it returns
        self.started: dict[int, float] = {}

    def loop(self) -> None:
        """Hand tasks to idle workers and take their answers until every job has ended."""
        waited = 0.0  # seconds spent with nothing out but workers Ray is restarting
        while self.pending or self.inflight:
            self._dispatch()
            if not self.inflight and (not self.reviving or waited >= self.batch.placement_timeout):
                for task in self.pending:  # tasks are left, but no worker is
                    if task.job.line not in self.ended:
                        self._end(task.job, "every worker died; no worker is left to run it")
                self.pending.clear()
                break
            every = STATUS_EVERY_S  # back in Python at least this often, so that Ctrl-C and SIGTERM act at once
            if not self.inflight:
                every = min(every, self.batch.placement_timeout - waited)
            started = time.monotonic()
            ready, _ = ray.wait([*self.inflight, *self.reviving], num_returns=1, timeout=every)
            waited = waited + time.monotonic() - started if not self.inflight else 0.0
            self.batch.show_status()
            if not ready:
                continue
            [ref] = ready
            if ref in self.reviving:
                self._revived(ref)
                continue
            task, rank = self.inflight.pop(ref)
            try:
                value = ray.get(ref)
            except RayActorError:  # the worker died (killed, out of memory, its node gone)
                self._died(task, rank)
                continue
            except RayError as e:  # what the task reads was lost with a node (a segmented job's plan): it fails alone
                self.idle.append(rank)
                if task.job.line not in self.ended:
                    self._end(task.job, f"lost with a Ray node: {one_line(e)}")
                continue
            self.idle.append(rank)
            self.batch.pids[rank] = value["pid"]  # a restarted worker has a new one
            if task.job.line in self.ended:  # a sibling segment already failed this job
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
            task.tries += 1
            self.started.setdefault(task.job.line, time.perf_counter())
            self.inflight[self._submit(task, rank)] = (task, rank)
            if self.on_dispatch is not None:
                self.on_dispatch(task, self.batch.pids[rank])

    def _submit(self, task: Task, rank: int):
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

    def _next(self, task: Task, value: dict[str, Any]) -> list[Task]:
        """Take a task's answer; returns the tasks it makes ready (the renders after a plan, the finish after the
        last render)."""
        job = task.job
        if value.get("error"):
            self._end(job, value["error"])
            return []
        if task.kind == "plan":
            state = self.segmented[job.line]
            state.ranges = split_chunks(value["num_chunks"], job.segments, value.get("edited"))
            return [Task("render", job, (i, r)) for i, r in enumerate(state.ranges)]
        if task.kind == "render":
            state = self.segmented[job.line]
            state.parts[task.args[0]] = value["part"]
            return [Task("finish", job)] if len(state.parts) == len(state.ranges) else []
        fields = {k: v for k, v in value.items() if k not in ("error", "pid")}
        self._end(job, None, **{**fields, "seconds": round(time.perf_counter() - self.started[job.line], 3)})
        return []

    def _died(self, task: Task, rank: int) -> None:
        """Worker ``rank`` died running ``task``: the task goes first to the next idle worker (the job fails after
        :data:`MAX_ATTEMPTS` tries), and the worker rejoins the pool once Ray has restarted it."""
        log.warning("worker %d died during %s of line %d", rank, task.kind, task.job.line)
        if task.job.line in self.ended:
            self._tidy(task.job)
        elif task.tries < MAX_ATTEMPTS:
            self.pending.appendleft(task)
        else:
            self._end(task.job, f"the worker running it died {MAX_ATTEMPTS} times (killed, or out of memory?)")
        self.batch.lost.add(rank)
        self._revive(rank)

    def _revive(self, rank: int) -> None:
        """Ask worker ``rank`` for its pid: the answer comes once Ray has restarted it."""
        self.reviving[self.batch.handles[rank].ready.options(max_task_retries=MAX_RESTARTS).remote()] = rank

    def _revived(self, ref: Any) -> None:
        rank = self.reviving.pop(ref)
        try:
            self.batch.pids[rank] = ray.get(ref)["pid"]
        except ActorUnavailableError:  # still restarting: ask again, a moment later
            time.sleep(REVIVE_EVERY_S)
            self._revive(rank)
            return
        except RayActorError as e:
            log.warning("worker %d could not be restarted (%s); %d left", rank, one_line(e),
                        len(self.idle) + len(self.inflight))
            return
        self.batch.lost.discard(rank)
        self.idle.append(rank)

    def _end(self, job: Job, error: str | None, **fields: Any) -> None:
        self.ended.add(job.line)
        self.segmented.pop(job.line, None)
        self._tidy(job)
        self.report(result_line(job.line, job.video, job.output, "failed" if error else "succeeded", error,
                                **fields))

    def _tidy(self, job: Job) -> None:
        # The work folder goes once no task of the job can still write into it.
        if not any(t.job.line == job.line for t, _ in self.inflight.values()):
            job.remove_work_dir()
