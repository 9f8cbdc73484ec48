"""``python -m latentsync.batch JOBS.jsonl --results RESULTS.jsonl``: the flags, and the run from the jobs file to
the results file (one JSON line per job, written as each ends).

Exit status 0 when every job succeeded or was skipped, 1 when one failed (or the machine did), 2 on a bad command,
130/143 after Ctrl-C/SIGTERM: the workers are stopped, finished outputs kept, and every job still gets its line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentsync.batch.jobs import Job, is_complete, read_jobs, result_line
from latentsync.errors import InputError, Interrupted
from latentsync.settings import Settings, add_model_arguments
from latentsync.signals import Stop, exit_with, run_door

log = logging.getLogger("latentsync.batch")


def build_parser() -> argparse.ArgumentParser:
    """The batch command's flags; the model flags are the CLI's own (same help, same environment defaults)."""
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
    settings = Settings.from_args(args, os.environ)
    from latentsync.devices import use_expandable_segments

    use_expandable_segments()  # before torch touches CUDA; a local Ray's workers inherit it
    jobs, bad = read_jobs(args.jobs, args.segments)
    return _run(args, settings, jobs, bad, stop, on_dispatch)


def entry() -> None:
    """``python -m latentsync.batch`` and the ``latentsync-batch`` command: run :func:`main`, exit with its status."""
    exit_with(main())


def _run(args: argparse.Namespace, settings: Settings, jobs: list[Job], bad: list[dict[str, Any]], stop: Stop,
         on_dispatch: Callable[[Any, int], None] | None) -> int:
    import dataclasses

    from tqdm.auto import tqdm

    from latentsync.batch.driver import Batch, connect, plan_workers
    from latentsync.manifest import read_manifest

    # Nodes need no copy of the manifest file: the workers get its parsed lines.
    settings = dataclasses.replace(settings, manifest=tuple(read_manifest(settings.manifest)))
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
            with connect(args.address, stop, verbose=args.verbose) as local, \
                    tempfile.TemporaryDirectory(prefix="latentsync-batch-") as tmp:
                if local:  # verify or fetch the weights once here, not in every worker at once
                    settings.weights()
                workers, resources = plan_workers(args.workers, settings.device)
                batch = Batch(settings, workers, resources=resources, temp_name=Path(tmp).name)
                try:
                    batch.run(todo, report, on_dispatch)
                except (KeyboardInterrupt, Interrupted):  # Ctrl-C or SIGTERM (Ray's wait turns what the handler
                    # raises into KeyboardInterrupt): every job still gets its line, so RESULTS says what a re-run
                    # will do
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
