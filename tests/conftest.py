"""Shared fixtures: where ``../shared`` is, and the skip rule for tests that need it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LATENTSYNC_SHARED", REPO.parent / "shared"))


def shared_file(*parts: str) -> Path:
    """A file under ``../shared``; the test is skipped (with the reason) when ``../shared`` is absent."""
    path = SHARED.joinpath(*parts)
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); parity fixtures and reference assets live there")
    if not path.exists():
        pytest.fail(f"{path} is missing although {SHARED} exists")
    return path


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return shared_file("parity")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return shared_file("reference")


@pytest.fixture(scope="session", autouse=True)
def no_system_ffmpeg(tmp_path_factory):
    """The whole suite runs with decoy ffmpeg/ffprobe first on PATH, which fail loudly if anything runs them: the
    project must use its pinned build (imageio-ffmpeg) only, whatever the machine has installed."""
    decoys = tmp_path_factory.mktemp("decoy-bin")
    trace = decoys / "ran.log"
    for name in ("ffmpeg", "ffprobe", "ffplay"):
        (decoys / name).write_text(f"#!/bin/sh\necho \"{name} $*\" >> '{trace}'\n"
                                   f"echo 'a system {name} was run; the project must use its pinned ffmpeg' >&2\n"
                                   "exit 97\n")
        (decoys / name).chmod(0o755)
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{decoys}{os.pathsep}{saved}"
    yield
    os.environ["PATH"] = saved
    if trace.exists():
        pytest.fail(f"a system ffmpeg/ffprobe was run during the tests: {trace.read_text()}")


@pytest.fixture
def fake_cuda(monkeypatch):
    """One H100-like CUDA device on the CPU (tests/fake_cuda.py): torch.cuda's own code over a stand-in driver."""
    from fake_cuda import FakeCuda

    fake = FakeCuda().install(monkeypatch)
    yield fake
    fake.uninstall()


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Two CUDA devices on the CPU, as ``fake_cuda``."""
    from fake_cuda import FakeCuda

    fake = FakeCuda(2).install(monkeypatch)
    yield fake
    fake.uninstall()
