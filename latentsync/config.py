"""Reading upstream-schema YAML configs (``configs/unet/*.yaml``, ``configs/syncnet/*.yaml``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from latentsync.options import check_file

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float, as OmegaConf (upstream) does; PyYAML would give a str."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read an upstream YAML config file into plain dicts and lists; a missing one is an InputError naming it."""
    with open(check_file("config file", path), encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader) or {}


def config_path(name: str) -> Path:
    """Path of a config shipped with the package, e.g. ``config_path("unet/stage2_512.yaml")``."""
    return CONFIGS_DIR / name
