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
