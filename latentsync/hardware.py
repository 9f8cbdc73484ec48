"""What this machine can run on, asked without importing torch: the CLI turns down a device the machine lacks in
milliseconds, where importing torch alone takes seconds on a busy machine.

Only certainties count here: a torch build without CUDA support, no GPU driver at all, MPS anywhere but macOS.
Whatever only torch can tell (a GPU index past the last GPU, a driver too old for the build) is left to
``latentsync.devices.pick_device``, which asks torch once it is imported.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
import sys
from pathlib import Path

from latentsync.errors import InputError

NO_CUDA_BUILD = "this torch build has no CUDA support"
NO_CUDA_GPU = "no CUDA GPU is visible on this machine"
NO_MPS = "Apple's MPS is not available on this machine"
USE_CPU = "run on the CPU (device 'cpu') or leave the device out"
DEVICE_HELP = "use cpu, cuda, cuda:N or mps, or leave the device out to pick CUDA when present"


def check_device(device: str | None) -> str | None:
    """The device a flag names (``cpu``, ``cuda``, ``cuda:N``, ``mps``), in lower case; None: the best one here. Any
    other name is an ``InputError`` found without importing torch (whether the machine has it is checked later)."""
    if device is None:
        return None
    name = str(device).strip().lower()
    if not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", name):
        raise InputError(f"unknown device {str(device)!r}; {DEVICE_HELP}")
    return name


def check_device_available(device: str | None) -> None:
    """An ``InputError`` when this machine certainly lacks ``device`` (a name as :func:`check_device` gives
    it; None: the best one here, always available); nothing when it has it or only torch can tell."""
    kind = (device or "").split(":")[0]
    why = None
    if kind == "cuda":
        why = cuda_missing()
    elif kind == "mps" and sys.platform != "darwin":  # torch's MPS backend exists on macOS only
        why = NO_MPS
    if why:
        raise InputError(f"device {device!r} asked for, but {why}; {USE_CPU}")


def cuda_missing() -> str | None:
    """Why torch certainly sees no CUDA device here; None when it may see one."""
    if torch_gpu_build() is False:
        return NO_CUDA_BUILD
    if gpu_driver_present() is False:
        return f"{NO_CUDA_GPU} (no GPU driver is installed)"
    return None


def torch_gpu_build() -> bool | None:
    """Whether the installed torch was built for CUDA or ROCm (ROCm's GPUs answer to "cuda" too), read from
    ``torch/version.py`` without importing torch; None when that file does not say."""
    spec = importlib.util.find_spec("torch")  # a top-level package is found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    values = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(\S.*?)\s*$", text, re.MULTILINE))
    if set(values) != {"cuda", "hip"}:
        return None
    return any(value != "None" for value in values.values())


def gpu_driver_present() -> bool | None:
    """On Linux, whether a GPU driver torch could use is installed: NVIDIA's (its user-space library, which the
    container toolkit mounts only into containers given a GPU) or AMD's (its kernel device); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    if Path("/dev/kfd").exists():
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# glibc's mallopt parameter for the size from which malloc serves a block with its own mmap (malloc.h), and ours.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024


def map_large_buffers() -> bool:
    """Have glibc serve every block of 256 KiB or more (frames, crops, features) with its own mmap, handed back to
    the system when freed; True once set, False where the C library is not glibc.

    By default glibc raises that threshold each time such a block is freed (up to 32 MiB): frames then come from
    the heaps of the threads that allocate them, and with the face pass, the stages and ffmpeg's readers allocating
    and freeing at uneven speeds those heaps fragment, so the peak grew with the video's length (a 60 s run's peak
    up to 1.13 × a 10 s run's). A fixed threshold also turns the raising off. Process-wide and idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): its allocator, its rules
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
