"""The batch command's own folders: a local Ray's sockets fit their 107-byte limit under a long TMPDIR, nothing of the
driver's is left in TMPDIR, and the folders of processes that died without cleaning up go with a later run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentsync.batch.folders import make_folder, remove_stale
from media_utils import face_clip, speech
from tiny_weights import tiny_weights_with_manifest

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]


def test_a_local_batch_under_a_long_tmpdir_runs_and_leaves_nothing_there(tmp_path_factory, tmp_path):
    folder, cfg, manifest = tiny_weights_with_manifest(tmp_path_factory)
    clip, audio = face_clip(tmp_path / "clip.mp4", 25), speech(tmp_path / "speech.wav", 1.0)
    temp = tmp_path / ("a-temporary-folder-on-a-bigger-disk-" + "x" * 40)  # Ray's socket paths would pass 107 bytes
    temp.mkdir()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"video": str(clip), "audio": str(audio), "output": str(tmp_path / "o.mp4"),
                                "inference_steps": 2, "loop_mode": "cut_off", "segments": 2}) + "\n")
    env = {**os.environ, "TMPDIR": str(temp), "LATENTSYNC_MANIFEST": str(manifest), "RAY_AUTH_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "latentsync.batch", str(jobs), "--results", str(tmp_path / "r.jsonl"),
                        "--workers", "2", "--weights-dir", str(folder), "--unet-config", str(cfg), "--syncnet-config",
                        str(folder / "syncnet.yaml"), "--device", "cpu", "-q"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    [line] = [json.loads(text) for text in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert line["status"] == "succeeded"
    # Nor an empty torchinductor_<user> (the segments' parts read back in the driver import the models).
    assert sorted(p.name for p in temp.iterdir()) == []
    assert not [p for p in Path("/tmp").glob(f"latentsync-ray-*-{os.getpid()}")]


def test_a_later_run_removes_the_folders_of_processes_that_are_gone(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f"latentsync-batch-1a2b3c4d-0-{int(dead.stdout)}"
    (gone / "part").mkdir(parents=True)  # a worker killed with its driver (SIGKILL) cleaned nothing up
    mine = make_folder("latentsync-batch", tmp_path)
    parent = tmp_path / f"latentsync-batch-1a2b3c4d-1-{os.getppid()}"  # a process still running
    other = tmp_path / f"someone-else-{int(dead.stdout)}"
    for folder in (parent, other):
        folder.mkdir()
    remove_stale(tmp_path, "latentsync-batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, parent.name, other.name])
