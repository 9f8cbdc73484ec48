"""LatentSync lip-sync: audio-conditioned latent diffusion on aligned face crops.

Data flows one way: ``audio`` → ``face`` → ``align`` → ``sampling`` (with ``models``) → ``video``,
orchestrated by ``pipeline``; ``weights`` loads every checkpoint.
"""
from latentsync.errors import InputError

__all__ = ["InputError"]
__version__ = "0.1.0"
