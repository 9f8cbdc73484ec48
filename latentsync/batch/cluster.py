"""Ray itself: :func:`connect` joins (or starts) the cluster, :func:`plan_workers` fits the workers to its nodes."""
from __future__ import annotations

import logging
import math
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from latentsync.batch.folders import RAY_PREFIX, make_folder, ray_temp_folder
from latentsync.errors import ResourceError, one_line
from latentsync.signals import Stop

CONNECT_TIMEOUT_S = 10.0
WAIT_SLICE_S = 0.2  # the longest the driver waits on Ray without returning to Python (where signals are handled)


def get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` that returns to Python every :data:`WAIT_SLICE_S`: a signal's handler runs only then, so Ctrl-C
    and SIGTERM stop a batch whose workers are still loading at once, not once they have loaded."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(refs) if isinstance(refs, list) else [refs]
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise GetTimeoutError(f"not ready within {timeout:g} s")
        try:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_SLICE_S if left is None else
                                  min(WAIT_SLICE_S, left))
        except SystemError as e:  # a signal handler raised inside Ray's wait, which wraps its exception
            if e.__cause__ is None:
                raise
            raise e.__cause__ from None
        if not pending:
            return ray.get(refs)


@contextmanager
def connect(address: str | None, stop: Stop | None = None, *, verbose: bool = False) -> Iterator[bool]:
    """Join the cluster at ``address``, reuse the Ray this process already joined, or start a local one that stops
    with the command (also on Ctrl-C); yields whether the cluster is ours. ``stop`` handles the signals again
    once ``ray.init`` has installed its own SIGTERM handler (exit at once), so SIGTERM unwinds like Ctrl-C."""
    if ray.is_initialized():
        yield False
        return
    local: dict[str, Any] = {}
    folders: list[Path] = []
    if address is not None:
        _check_reachable(address)
    else:
        # A local Ray keeps its files (and its Unix sockets, whose paths may not pass 107 bytes) in a folder of our
        # own, short enough; objects it spills to disk go to the temporary folder all the same.
        folders.append(ray_temp_folder())
        local["_temp_dir"] = str(folders[0])
        if folders[0].parent != Path(tempfile.gettempdir()):
            folders.append(make_folder(RAY_PREFIX, Path(tempfile.gettempdir())))
            local["object_spilling_directory"] = str(folders[1])
    try:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                     logging_level=logging.INFO if verbose else logging.WARNING, **local)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ResourceError(f"could not {'join the Ray cluster at ' + address if address else 'start Ray'}: "
                                f"{one_line(e)}") from None
        try:
            with stop.handling() if stop is not None else nullcontext():
                yield address is None
        finally:
            ray.shutdown()  # stops the local cluster's processes when we started it; only disconnects otherwise
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        if "torch._dynamo" in sys.modules:  # a segment's part, read back here, imports the models (and inductor)
            from latentsync.models.compiled import remove_unused_inductor_folder

            remove_unused_inductor_folder()


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
    """How many workers, and the Ray resources of each, chosen so that all of them fit on the cluster's nodes: a
    GPU each where the cluster has GPUs and the device allows (default: one per GPU), else a node's CPUs (default:
    one worker per node; Ray sets each worker's thread count from its CPUs). More workers than fit whole share."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    gpus, cpus = [r.get("GPU", 0.0) for r in nodes], [r.get("CPU", 0.0) for r in nodes]
    use_gpu = sum(gpus) > 0 and not (device or "").startswith("cpu")
    if device and device.startswith("cuda") and not use_gpu:
        raise ResourceError("--device cuda was asked for, but the Ray cluster has no GPU")
    if use_gpu:  # more workers than GPUs share them (Ray's fractional GPUs): allowed, but not faster
        n = workers or max(1, int(sum(gpus)))
        return n, {"num_gpus": _share(gpus, n), "num_cpus": 1}
    if not sum(cpus):
        raise ResourceError("the Ray cluster has no CPU for a worker; start its nodes with CPUs (ray start --num-cpus)")
    n = workers or max(1, sum(1 for c in cpus if c >= 1))
    return n, {"num_cpus": _share(cpus, n)}


def _share(per_node: list[float], n: int) -> float:
    """The most of one resource that each of ``n`` workers can have with all of them placed on nodes holding
    ``per_node`` of it: whole units if they fit, else an equal fraction of one (Ray counts in 1/10000)."""
    for each in range(int(max(per_node)), 0, -1):
        if sum(int(have // each) for have in per_node) >= n:
            return float(each)
    k = 2
    while sum(int(have * k) for have in per_node) < n:
        k += 1
    return math.floor(10_000 / k) / 10_000


def lacking(workers: int, bundle: dict[str, float], timeout: float) -> str:
    """One line: what the cluster lacks to place ``workers`` workers of ``bundle`` each."""
    free, total = ray.available_resources(), ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    need = " and ".join(f"{amount * workers:g} {name}" for name, amount in bundle.items())
    has = " and ".join(f"{free.get(name, 0):g} of {total.get(name, 0):g} {name}" for name in bundle)
    return (f"the Ray cluster could not place {workers} worker{'s' if workers > 1 else ''} ({need} in all) within "
            f"{timeout:g} s: {has} free on {nodes} node{'s' if nodes > 1 else ''}; free them, add nodes, or ask for "
            "fewer --workers")
