"""The batch's own temporary folders: each is named after the process that owns it (``NAME-…-PID``), so that a later
run on the same machine removes those of a process that died without cleaning up (SIGKILL, a lost node), and a
local Ray's folder kept short enough for its Unix sockets. No Ray here.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from latentsync.errors import ResourceError

UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108, the last one a NUL)
# What Ray adds below its temporary folder for its longest socket: "/session_DATE_TIME_USEC_PID/sockets/plasma_store"
# with a pid of up to 7 digits (Linux's pid_max goes to 4194304).
RAY_SOCKET_TAIL = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
RAY_PREFIX = "latentsync-ray"
SHORT_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")  # where a local Ray's sockets go when TMPDIR is too long for them


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner(name: str, prefix: str) -> int | None:
    """The pid that ends a folder name ``PREFIX-…-PID``, else None."""
    head, sep, pid = name.rpartition("-")
    return int(pid) if sep and name.startswith(prefix + "-") and len(head) > len(prefix) and pid.isdigit() else None


def remove_stale(root: Path, prefix: str) -> None:
    """Remove the folders ``PREFIX-…-PID`` in ``root`` whose owning process is gone."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for path in entries:
        pid = owner(path.name, prefix)
        if pid is not None and pid != os.getpid() and path.is_dir() and not path.is_symlink() and not alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def folder_name(prefix: str, middle: str) -> str:
    """``PREFIX-MIDDLE-PID``: a folder this process owns."""
    return f"{prefix}-{middle}-{os.getpid()}"


def make_folder(prefix: str, root: Path) -> Path:
    """A new folder ``PREFIX-RANDOM-PID`` in ``root``, owned by this process."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", suffix=f"-{os.getpid()}", dir=root))


def ray_temp_folder() -> Path:
    """A new folder for a local Ray's files, ``latentsync-ray-…-PID``: in the temporary folder (``TMPDIR``) when
    Ray's socket paths fit there, else in a short system one; a ``ResourceError`` when none can hold them. Folders
    of earlier commands that were killed are removed first."""
    roots = [Path(tempfile.gettempdir()), *(Path(r) for r in SHORT_ROOTS)]
    for root in dict.fromkeys(roots):
        remove_stale(root, RAY_PREFIX)
        if len(os.fsencode(root / folder_name(RAY_PREFIX, "12345678"))) + RAY_SOCKET_TAIL > UNIX_PATH_MAX:
            continue  # mkdtemp's random part is 8 characters
        try:
            return make_folder(RAY_PREFIX, root)
        except OSError:
            continue
    raise ResourceError(f"Ray's socket paths in the temporary folder {tempfile.gettempdir()} would pass the "
                        f"{UNIX_PATH_MAX}-byte limit of Unix sockets, and none of {', '.join(SHORT_ROOTS)} can be "
                        "written; point TMPDIR at a shorter path")
