"""Reading upstream-schema YAML configs (``configs/unet/*.yaml``, ``configs/syncnet/*.yaml``) and the shipped data.

The repository keeps ``configs/`` and ``weights.txt`` at its top level; an installed wheel carries copies of them in
``latentsync/_data/`` (``setup.py`` puts them there at build time), found with ``importlib.resources``.

A weights folder may carry its own model configs, ``unet.yaml`` and ``syncnet.yaml`` (and its own manifest,
``weights.txt``, see ``latentsync.manifest``): a folder of weights other than the official ones then runs with
nothing named but the folder. A config named by the caller still wins over the folder's.
"""
from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any

import yaml

from latentsync.errors import InputError, one_line
from latentsync.options import check_file

_CHECKOUT = Path(__file__).resolve().parent.parent  # a source checkout or an editable install


def data_path(name: str) -> Path:
    """A file or folder shipped with the package (``"weights.txt"``, ``"configs"``), installed or in a checkout."""
    packaged = importlib.resources.files("latentsync") / "_data" / name
    if packaged.is_file() or packaged.is_dir():
        return Path(str(packaged))  # wheels install as plain files: the path stays valid after this call
    return _CHECKOUT / name


CONFIGS_DIR = data_path("configs")


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


def load_config(path: str | Path, name: str = "config file", section: str | None = None) -> dict[str, Any]:
    """Read an upstream YAML config file into plain dicts and lists; a missing, unreadable or non-YAML one, or one
    without the mapping ``section`` (e.g. ``"model"``) when given, is an ``InputError`` naming it as ``name``."""
    path = check_file(name, path)
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=_Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{name} {path} is not a readable YAML file: {one_line(e)}") from e
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise InputError(f"{name} {path} holds a {type(config).__name__}, not a YAML mapping (an upstream config)")
    if section is not None and not isinstance(config.get(section), dict):
        raise InputError(f"{name} {path} has no {section}: section (expected an upstream configs/*/*.yaml)")
    return config


# The model configs a weights folder may hold for itself.
FOLDER_UNET_CONFIG, FOLDER_SYNCNET_CONFIG = "unet.yaml", "syncnet.yaml"


def folder_file(weights_dir: str | Path | None, name: str) -> Path | None:
    """``weights_dir/name`` when the folder holds that file (its own manifest or model config), else None."""
    if weights_dir is None:
        return None
    path = Path(weights_dir) / name
    return path if path.is_file() else None


def folder_configs(weights_dir: str | Path, unet_config: str | Path | None = None,
                   syncnet_config: str | Path | None = None) -> tuple[str | Path | None, str | Path | None]:
    """The U-Net and SyncNet configs to load ``weights_dir`` with: each one given, else the folder's own
    (``unet.yaml``, ``syncnet.yaml``), else None (the version's shipped config)."""
    return (unet_config or folder_file(weights_dir, FOLDER_UNET_CONFIG),
            syncnet_config or folder_file(weights_dir, FOLDER_SYNCNET_CONFIG))


def config_path(name: str) -> Path:
    """Path of a config shipped with the package, e.g. ``config_path("unet/stage2_512.yaml")``."""
    return CONFIGS_DIR / name
