"""LatentSync lip-sync: audio-conditioned latent diffusion on aligned face crops.

Data flows one way: ``audio`` → ``face`` → ``align`` → ``sampling`` (with ``models``) → ``video``,
orchestrated by ``pipeline``; ``weights`` loads every checkpoint; ``options`` holds every run option.
"""
from latentsync.errors import InputError, LatentSyncError, ResourceError

__all__ = ["InputError", "LatentSyncError", "LipSync", "ResourceError", "RunOptions"]
__version__ = "0.1.0"

_LAZY = {"LipSync": "latentsync.pipeline", "RunOptions": "latentsync.options"}


def __getattr__(name: str):
    """``from latentsync import LipSync`` without making ``import latentsync`` load torch."""
    if name not in _LAZY:
        raise AttributeError(f"module 'latentsync' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
