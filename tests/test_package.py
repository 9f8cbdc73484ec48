"""``pip wheel`` + install into a fresh environment + a run from outside the checkout: the package is whole.

The wheel is built from a copy of the sources (nothing is written into the checkout), installed without its
dependencies into a new virtual environment that borrows the already installed ones (torch and friends) through a
``.pth`` line, and used from a folder outside the checkout: the manifest and configs must come from the wheel.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from latentsync.manifest import read_manifest
from tiny_weights import make_tiny_weights

pytestmark = pytest.mark.slow

SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests",
                              "benchmarks", "samples", "checkpoints", "weights", "_data")

RUN = """
import json, sys
from pathlib import Path
import latentsync
from latentsync.config import config_path
from latentsync.loader import load_scheduler
from latentsync.manifest import manifest_path, read_manifest
from latentsync.pipeline import LipSync

weights, unet_config = Path(sys.argv[1]), Path(sys.argv[2])
pipe = LipSync.from_pretrained(weights, unet_config=unet_config, syncnet_config=weights / "syncnet.yaml",
                               device="cpu")
print(json.dumps({"package": latentsync.__file__, "manifest": str(manifest_path()),
                  "entries": len(read_manifest()), "unet_config": str(config_path("unet/stage2_512.yaml")),
                  "resolution": pipe.models.resolution, "has_scheduler": load_scheduler("unipc") is not None}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(REPO, tmp / "src", ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, cwd=tmp)
    (built,) = (tmp / "dist").glob("latentsync-*.whl")
    return built


def test_wheel_carries_the_manifest_and_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "latentsync/_data/weights.txt" in names
    configs = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*") if p.is_file()}
    assert {f"latentsync/_data/{c}" for c in configs} <= names
    with zipfile.ZipFile(wheel) as z:
        assert z.read("latentsync/_data/weights.txt") == (REPO / "weights.txt").read_bytes()


def test_installed_wheel_loads_tiny_weights_from_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The installed dependencies, as a plain path: the .pth files there (an editable latentsync) are not run.
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    weights, unet_config = make_tiny_weights(tmp_path / "tiny")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([python, "-c", RUN, str(weights), str(unet_config)], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("package", "manifest", "unet_config"):
        assert Path(seen[key]).is_relative_to(site), f"{key} came from {seen[key]}, not the installed wheel"
    assert seen["entries"] == len(read_manifest(REPO / "weights.txt"))
    assert seen["resolution"] == 64 and seen["has_scheduler"]
