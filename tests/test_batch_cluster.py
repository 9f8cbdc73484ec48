"""The batch command on a cluster of two 1-CPU Ray nodes started on this machine (loopback addresses, each node
with its own temporary folder, token authentication off as the README allows for a private network): the workers
fit the nodes, every job gets a line in every ending, and nothing is left in any node's temporary folder."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentsync.video.check import is_complete
from media_utils import face_clip, speech
from test_batch import media, weights  # noqa: F401 — the same module fixtures: tiny weights, short clips (F811 below)

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
FAST = {"inference_steps": 2, "loop_mode": "cut_off"}
HEAD, OTHER = "127.0.0.3", "127.0.0.2"  # Ray maps 127.0.0.1 to the machine's own address; these it keeps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD, 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop one node we started: its whole process group (the node's daemons and workers), by id."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, request):
    """Two Ray nodes of one CPU each; yields (address, {node ip: its temporary folder})."""
    base = Path(tmp_path_factory.mktemp("nodes"))
    temps = {HEAD: base / "tmp-head", OTHER: base / "tmp-other"}
    for folder in temps.values():
        folder.mkdir()
    port = _free_port()
    address = f"{HEAD}:{port}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    started = []
    request.addfinalizer(lambda: [_stop(p) for p in reversed(started)])
    for ip, cmd in ((HEAD, ["--head", "--port", str(port), "--include-dashboard", "false",
                            "--temp-dir", str(base / "ray")]),
                    (OTHER, ["--address", address])):
        # A node's processes stay in the process group of its `ray start`, which is how the finalizer stops them.
        p = subprocess.Popen([ray_cli, "start", *cmd, "--node-ip-address", ip, *common],
                             env={**env, "TMPDIR": str(temps[ip])}, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append(p)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode(errors="replace")[-2000:]
    return address, temps


@pytest.fixture(scope="module")
def long_media(tmp_path_factory):
    d = tmp_path_factory.mktemp("long-media")
    return {"clip100": face_clip(d / "clip100.mp4", 100), "speech_4s": speech(d / "speech4.wav", 4.0)}


@pytest.fixture
def batch(nodes, weights, tmp_path):  # noqa: F811
    """Start ``python -m latentsync.batch`` on the two-node cluster; returns the process (results: ``.results``)."""
    address, _ = nodes
    folder, cfg, manifest = weights
    driver_tmp = tmp_path / "tmp-driver"
    driver_tmp.mkdir()

    def start(jobs: list[dict], *flags: str) -> subprocess.Popen:
        jobs_file, results = tmp_path / "jobs.jsonl", tmp_path / "results.jsonl"
        jobs_file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "LATENTSYNC_MANIFEST": str(manifest),
               "TMPDIR": str(driver_tmp)}
        p = subprocess.Popen([sys.executable, "-m", "latentsync.batch", str(jobs_file), "--results", str(results),
                              "--address", address, "--weights-dir", str(folder), "--unet-config", str(cfg),
                              "--syncnet-config", str(folder / "syncnet.yaml"), "--device", "cpu", "-q", *flags],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.results, p.temps = results, [driver_tmp]  # type: ignore[attr-defined]
        return p

    return start


def _finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, list[dict], str]:
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        pytest.fail(f"the batch did not end within {timeout} s; stderr: {err[-2000:]}")
    assert p.results.exists(), f"no results file (exit status {p.returncode}); stderr: {err[-3000:]}"
    return p.returncode, [json.loads(line) for line in p.results.read_text().splitlines()], err


def _left(folders) -> list[str]:
    """What a batch left in these temporary folders (Ray's own files aside)."""
    return sorted(str(p) for folder in folders for p in Path(folder).glob("latentsync-*"))


def _jobs(clips, tmp_path, n: int, clip: str = "clip25", audio: str = "speech_1s") -> list[dict]:
    return [{"video": str(clips[clip]), "audio": str(clips[audio]), "output": str(tmp_path / f"o{i}.mp4"),
             "seed": i, **FAST} for i in range(n)]


@pytest.mark.parametrize("flags", [(), ("--workers", "3")], ids=["default-workers", "three-workers"])
def test_workers_fit_one_cpu_nodes_and_leave_nothing_on_any_node(batch, nodes, media, tmp_path, flags):  # noqa: F811
    p = batch(_jobs(media, tmp_path, 3), *flags)
    status, lines, err = _finish(p)
    assert status == 0, err
    assert sorted((r["line"], r["status"]) for r in lines) == [(1, "succeeded"), (2, "succeeded"), (3, "succeeded")]
    assert _left([*nodes[1].values(), *p.temps]) == [], "a worker's temporary folder was left on a node"


def test_workers_the_cluster_cannot_place_fail_every_job_in_one_line(batch, nodes, media, tmp_path):  # noqa: F811
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address=nodes[0], include_dashboard=False, log_to_driver=False)
    try:
        held = placement_group([{"CPU": 1}] * 2, strategy="STRICT_SPREAD")  # other work holds both CPUs
        ray.get(held.ready(), timeout=60)
        started = time.monotonic()
        status, lines, err = _finish(batch(_jobs(media, tmp_path, 2), "--placement-timeout", "3"))
        remove_placement_group(held)
    finally:
        ray.shutdown()
    assert status == 1 and time.monotonic() - started < 60
    [error] = [line for line in err.splitlines() if line.strip()]
    assert error == ("error: the Ray cluster could not place 2 workers (2 CPU in all) within 3 s: 0 of 2 CPU free "
                     "on 2 nodes; free them, add nodes, or ask for fewer --workers")
    assert sorted(r["line"] for r in lines) == [1, 2] and {r["status"] for r in lines} == {"failed"}
    assert {r["error"] for r in lines} == {error.removeprefix("error: ")}


def _wait_for(pattern: str, folders, p: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(any(Path(f).glob(pattern)) for f in folders):
        assert p.poll() is None, f"the batch ended first: {p.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"nothing matched {pattern} within {timeout} s"
        time.sleep(0.05)


@pytest.mark.parametrize("moment", ["while-loading", "while-rendering"])
def test_sigterm_leaves_nothing_on_any_node_and_every_job_a_line(batch, nodes, long_media, tmp_path, moment):
    temps = nodes[1]
    p = batch(_jobs(long_media, tmp_path, 3, "clip100", "speech_4s"), "--workers", "2")
    if moment == "while-loading":  # a worker's folder appears just before it loads the models
        _wait_for("latentsync-batch-*", temps.values(), p)
    else:  # the other node's worker is writing a part
        _wait_for("latentsync-batch-*/**/*.part.mp4", [temps[OTHER]], p)
    p.send_signal(signal.SIGTERM)
    status, lines, err = _finish(p, timeout=120)
    assert status == 143, err
    assert sorted(r["line"] for r in lines) == [1, 2, 3], "every job gets exactly one line"
    stopped = [r for r in lines if r["status"] == "failed"]
    assert stopped and {r["error"] for r in stopped} == {"interrupted (Ctrl-C or SIGTERM) before it finished"}
    assert _left([*temps.values(), *p.temps]) == [], "a stopped worker's files were left on a node"
    assert not list(tmp_path.glob(".*latentsync-work")) and not any(Path(r["output"]).exists() for r in stopped)
    # A job that ended as the batch stopped (its output renamed into place) says so, as its re-run will.
    assert all(is_complete(Path(r["output"])) for r in lines if r["status"] == "succeeded")


def test_a_job_whose_node_died_moves_to_a_worker_on_a_live_node(batch, nodes, long_media, tmp_path):
    # A third node, ours to kill: a worker on each node, the killed one's job goes to the first worker free.
    address, temps = nodes
    extra = tmp_path / "tmp-extra"
    extra.mkdir()
    node = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--address", address,
                             "--node-ip-address", "127.0.0.4", "--num-cpus", "1", "--num-gpus", "0",
                             "--disable-usage-stats"], env={**os.environ, "RAY_AUTH_MODE": "disabled",
                                                            "PYTHONPATH": str(ROOT), "TMPDIR": str(extra)},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = node.communicate(timeout=120)
        assert node.returncode == 0, out.decode(errors="replace")[-2000:]
        p = batch(_jobs(long_media, tmp_path, 3, "clip100", "speech_4s"), "--workers", "3")  # a job on each
        _wait_for("latentsync-batch-*/**/*.part.mp4", [extra], p)  # the extra node's worker is rendering
        os.killpg(node.pid, signal.SIGKILL)  # the node's raylet and its workers, all at once
        status, lines, err = _finish(p, timeout=200)
    finally:
        _stop(node)
    assert status == 0, err
    assert sorted((r["line"], r["status"]) for r in lines) == [(1, "succeeded"), (2, "succeeded"), (3, "succeeded")]
    assert all(is_complete(Path(r["output"])) for r in lines)
