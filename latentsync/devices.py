"""Which torch device and dtype a run uses."""
from __future__ import annotations

import torch

from latentsync.errors import InputError


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU, unless the caller names one."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Upstream's rule: fp16 on CUDA sm_80+, fp32 elsewhere; ``"bf16"``/``"fp16"``/``"fp32"`` or a dtype override it."""
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
        return names[dtype]
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.float16
    return torch.float32
