"""Loading checkpoints in the upstream formats, strictly: a missing, unexpected or mis-shaped key is an error."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from latentsync.errors import InputError

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path, *, key: str | None = "state_dict") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, bare ``.pt`` state dict or upstream ``{"state_dict": ...}`` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except InputError:
        raise
    except Exception as e:  # a truncated or foreign file: say which one
        raise InputError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(obj, Mapping) and key is not None and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path} is not a state dict (expected tensors, optionally under {key!r})")
    return dict(obj)


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', …' if len(keys) > limit else ''})"


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise naming the first few and the count of missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {_names(shapes)}")
    if problems:
        raise InputError(f"{what} does not match the model: " + "; ".join(problems))


def load_strict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, *, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Check the keys, then assign the tensors (works on a meta-device model: no random init is paid)."""
    check_keys(model, state_dict, what)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model
