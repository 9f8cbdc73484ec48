"""LatentSync lip-sync: audio-conditioned latent diffusion on aligned face crops.

A run is ``pipeline.LipSync``: ``plan`` (probe, ``audio`` features, the face track of ``tracking``/``face``,
the ``timeline``) → ``render`` (the ``stages`` package: align → generate (VAE, ``sampling`` with ``models``) →
paste → score, joined by bounded queues) → ``finish`` (join, mux, sync score). ``loader`` builds the frozen
``Models`` from ``weights`` (strict checkpoint readers); ``manifest``/``download`` verify or fill the weights
folder; ``video`` reads and writes media through one pinned ffmpeg. The front doors (``cli``, ``batch``, the Cog
``predict.py``) share ``settings`` (environment + flags), ``options`` (every run option, once), ``errors``,
``signals`` and ``progress``.
"""
import importlib

from latentsync.errors import InputError, LatentSyncError, ResourceError

__all__ = ["InputError", "LatentSyncError", "LipSync", "ResourceError", "RunOptions"]
__version__ = "0.1.0"

_LAZY = {"LipSync": "latentsync.pipeline", "RunOptions": "latentsync.options"}


def __getattr__(name: str):
    """``from latentsync import LipSync`` without making ``import latentsync`` load torch."""
    if name not in _LAZY:
        raise AttributeError(f"module 'latentsync' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
