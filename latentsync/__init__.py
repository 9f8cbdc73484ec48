"""LatentSync lip-sync: audio-conditioned latent diffusion on aligned face crops.

Data flows one way: ``audio`` → ``face`` → ``align`` → ``sampling`` (with ``models``) → ``video``,
orchestrated by ``pipeline``; ``weights`` loads every checkpoint; ``options`` holds every run option.
"""
from latentsync.errors import InputError, LatentSyncError, ResourceError

__all__ = ["InputError", "LatentSyncError", "ResourceError"]
__version__ = "0.1.0"
