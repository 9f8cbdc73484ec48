"""Which torch device and dtype a run uses; a device or dtype the machine cannot give is an ``InputError``."""
from __future__ import annotations

import torch

from latentsync.errors import InputError
from latentsync.options import DTYPES

DEVICE_HELP = "use cpu, cuda, cuda:N or mps, or leave the device out to pick CUDA when present"
_USE_CPU = "run on the CPU (device 'cpu') or leave the device out"
_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU, unless the caller names one; a name torch does not know, or a CUDA/MPS device
    this machine lacks, is an ``InputError`` (one line) rather than torch's traceback at the first tensor."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip().lower())
        except (RuntimeError, ValueError):  # torch's message lists two dozen internal device types
            raise InputError(f"unknown device {str(device)!r}; {DEVICE_HELP}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("no CUDA GPU is visible on this machine" if torch.backends.cuda.is_built()
                   else "this torch build has no CUDA support")
            raise InputError(f"device {str(device)!r} asked for, but {why}; {_USE_CPU}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"device {str(device)!r} asked for, but this machine has {count} CUDA GPU(s): "
                             f"cuda:0 … cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"device {str(device)!r} asked for, but Apple's MPS is not available on this machine; "
                             f"{_USE_CPU}")
    elif dev.type != "cpu":
        raise InputError(f"device {str(device)!r} is not supported; {DEVICE_HELP}")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Upstream's rule: fp16 on CUDA sm_80+, fp32 elsewhere; ``"bf16"``/``"fp16"``/``"fp32"`` or a dtype override it."""
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        if name not in _DTYPE_NAMES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return _DTYPE_NAMES[name]
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise InputError(f"dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is not None:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.float16
    return torch.float32
