"""``python -m latentsync.batch JOBS.jsonl --results RESULTS.jsonl``: the flags, and the run from the jobs file to
the results file (one JSON line per job, written as each ends).

Exit status 0 when every job succeeded or was skipped, 1 when one failed (or the machine did), 2 on a bad command,
130/143 after Ctrl-C/SIGTERM: the workers are stopped, finished outputs kept, and every job still gets its line.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from latentsync.batch.jobs import Job, Results, check_results, read_jobs, result_line
from latentsync.batch.worker import message
from latentsync.errors import InputError, Interrupted
from latentsync.manifest import read_manifest
from latentsync.settings import Settings, add_model_arguments
from latentsync.signals import Stop, exit_with, run_door
from latentsync.video.check import is_complete

log = logging.getLogger("latentsync.batch")

PLACEMENT_TIMEOUT_S = 120.0  # for the cluster to place every worker (an autoscaler may add nodes meanwhile)
MAX_PLACEMENT_TIMEOUT_S = 86_400.0  # a day: Ray's waits take a timeout it can count in milliseconds


def build_parser() -> argparse.ArgumentParser:
    """The batch command's flags; the model flags are the CLI's own (same help, same environment defaults)."""
    p = argparse.ArgumentParser(prog="python -m latentsync.batch",
                                description="Lip-sync every job of a JSON-lines file on a Ray cluster.")
    p.add_argument("jobs", type=Path,
                   help='JSON lines: {"video": …, "audio": …, "output": …, option: value, …}')
    p.add_argument("--results", required=True, help="JSON lines written here, one per job")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use (ray://host:10001, or auto); default: start a local one")
    p.add_argument("--workers", type=int, default=None,
                   help="workers, each with its own models (default: one per GPU, else one per node)")
    p.add_argument("--placement-timeout", type=float, default=PLACEMENT_TIMEOUT_S, metavar="SECONDS",
                   help=f"how long the cluster may take to place every worker (default {PLACEMENT_TIMEOUT_S:g})")
    p.add_argument("--segments", type=int, default=1,
                   help="cut each video into N parts rendered at once (a job's \"segments\" overrides it)")
    add_model_arguments(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--verbose", action="store_true", help="show the workers' own logs")
    return p


def main(argv: list[str] | None = None, *, on_dispatch: Callable[[Any, int], None] | None = None) -> int:
    """Run a batch; exit status 0 when every job succeeded or was skipped, 1 otherwise, 2 on a bad command.
    ``on_dispatch(task, worker_pid)`` is called after each hand-out (tests kill workers there)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_door(lambda stop: _checked_run(args, stop, on_dispatch),
                    stopped="the workers were stopped, finished outputs are kept and a re-run skips them")


def _checked_run(args: argparse.Namespace, stop: Stop, on_dispatch: Callable[[Any, int], None] | None) -> int:
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.segments < 1:
        raise InputError(f"--segments must be at least 1, got {args.segments}")
    if not 0 < args.placement_timeout <= MAX_PLACEMENT_TIMEOUT_S:
        raise InputError(f"--placement-timeout must be more than 0 and at most {MAX_PLACEMENT_TIMEOUT_S:g} seconds, "
                         f"got {args.placement_timeout:g}")
    settings = Settings.from_args(args, os.environ)
    from latentsync.devices import use_expandable_segments

    use_expandable_segments()  # before torch touches CUDA; a local Ray's workers inherit it
    # Every path of the batch is checked here, before Ray starts: a bad line fails alone.
    args.results = check_results(args.results)
    jobs, bad = read_jobs(args.jobs, args.segments, args.results)
    return _run(args, settings, jobs, bad, stop, on_dispatch)


def entry() -> None:
    """``python -m latentsync.batch`` and the ``latentsync-batch`` command: run :func:`main`, exit with its status."""
    exit_with(main())


def _run(args: argparse.Namespace, settings: Settings, jobs: list[Job], bad: list[dict[str, Any]], stop: Stop,
         on_dispatch: Callable[[Any, int], None] | None) -> int:
    todo = [j for j in jobs if not is_complete(j.output)]
    skipped = [j for j in jobs if j not in todo]
    counts: Counter[str] = Counter()
    ended: set[int] = set()
    with Results(args.results) as results, \
            tqdm(total=len(jobs) + len(bad), unit="job", desc="jobs", disable=args.quiet) as bar:

        def report(line: dict[str, Any], *, warn: bool = True) -> None:
            results.add(line)
            ended.add(line["line"])
            counts[line["status"]] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
            if warn and line["status"] == "failed":
                log.warning("line %s failed: %s", line["line"], line["error"])

        for line in bad:
            report(line)
        for job in skipped:
            report(result_line(job.line, job.video, job.output, "skipped"))
        try:
            if todo:
                _run_on_ray(args, settings, todo, report, stop, on_dispatch)
        except BaseException as e:
            # Every job gets its line in every ending, so RESULTS says what a re-run will do; the reason is said
            # once on stderr, not once per job.
            interrupted = stop.signum is not None or isinstance(e, (KeyboardInterrupt, Interrupted))
            reason = "interrupted (Ctrl-C or SIGTERM) before it finished" if interrupted else message(e)
            for job in todo:
                if job.line in ended:
                    continue
                if is_complete(job.output):  # it was renamed into place as the batch stopped: it did succeed
                    report(result_line(job.line, job.video, job.output, "succeeded", seed=job.options.seed))
                else:
                    report(result_line(job.line, job.video, job.output, "failed", reason), warn=False)
            raise
    print(f"{counts['succeeded']} succeeded, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"results in {args.results}")
    return 1 if counts["failed"] else 0


def _run_on_ray(args: argparse.Namespace, settings: Settings, todo: list[Job],
                report: Callable[[dict[str, Any]], None], stop: Stop,
                on_dispatch: Callable[[Any, int], None] | None) -> None:
    """Run the jobs ``todo`` on the cluster (started or joined here), reporting each as it ends."""
    from latentsync.batch.cluster import connect, plan_workers
    from latentsync.batch.driver import Batch

    # Nodes need no copy of the manifest file: the workers get its parsed lines (parsed here unless they already are).
    if not isinstance(settings.manifest, tuple):
        settings = dataclasses.replace(settings, manifest=tuple(read_manifest(settings.manifest)))
    with connect(args.address, stop, verbose=args.verbose) as local:
        if local:  # verify or fetch the weights once here, not in every worker at once
            settings.weights()
        workers, resources = plan_workers(args.workers, settings.device)
        batch = Batch(settings, workers, resources=resources, placement_timeout=args.placement_timeout,
                      status=not args.quiet, local=local)
        try:
            batch.run(todo, report, on_dispatch)
        finally:
            batch.close()
