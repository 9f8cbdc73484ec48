"""A read-only folder for tests: a tmpfs filled, then remounted read-only (root only; the test skips elsewhere)."""
from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def read_only_tmpfs(mount_point: Path, fill: Callable[[Path], object], size: str = "256m") -> Iterator[Path]:
    """Mount a tmpfs at ``mount_point``, let ``fill`` write into it, remount it read-only; unmount afterwards."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        fill(mount_point)
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        yield mount_point
    finally:
        # Lazily when still busy (a memory-mapped checkpoint not yet released): detached now, freed when closed.
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
