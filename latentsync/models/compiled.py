"""Opt-in ``torch.compile`` of the U-Net's two passes (full, DeepCache-shallow), behind the U-Net's own call, and
of the VAE's encoder and decoder; and the removal of the empty cache folder that merely importing torch's compiler
leaves in the temporary folder.

Inductor fuses the memory-bound work that takes ~40 % of an eager step (elementwise ops, layout copies, norms):
1.49× on a full step and 1.74× on a shallow one at 512 px on an H200. Dynamo compiles a graph for the exact sizes,
strides and dtypes of the inputs it first sees, so the loader warms the modules up by generating a chunk as a run
does (``loader.compile_models``), with and without guidance. Each U-Net pass is compiled only for the input
shapes of that warm-up; any other shape (a video's last, shorter chunk) runs eagerly rather than paying a second
compilation in the middle of a request.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latentsync.models.unet import DeepCache, UNet3DConditionModel, UNet3DConditionOutput

if TYPE_CHECKING:
    # From its own module: to a type checker, diffusers' top-level names are its placeholders for a missing torch.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

BACKEND = "inductor"  # torch.compile's default; tests swap in "eager" to check the plumbing in seconds


def use_cache_dir(folder: Path) -> Path:
    """Keep inductor's and Triton's compiled artefacts in ``folder``, so a later boot of the same machine reuses them.

    Inductor reads its cache location from its environment variable, so this sets it for the process.
    """
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def remove_unused_inductor_folder() -> None:
    """Remove inductor's folder in the temporary folder while it is empty: a load that compiles nothing leaves none.

    Importing ``torch._dynamo`` (diffusers does, so every load does) creates ``torchinductor_<user>`` in the temporary
    folder and points ``TORCHINDUCTOR_CACHE_DIR`` at it. A folder that holds compiled kernels is kept, and so is one
    named elsewhere: the user's choice, or a compiled load's cache (:func:`use_cache_dir`).
    """
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None:
        return
    folder = Path(chosen)
    if folder.parent != Path(tempfile.gettempdir()) or not folder.name.startswith("torchinductor_"):
        return
    with contextlib.suppress(OSError):  # not empty: something was compiled there, and it is kept
        folder.rmdir()
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]


def default_cache_root(cache_home: str | Path | None = None) -> Path:
    """``<cache_home>/latentsync/compile-cache`` (``cache_home``: ``~/.cache``): where compiled artefacts go when
    the weights folder is the user's, which is never written to."""
    return Path(cache_home or Path.home() / ".cache") / "latentsync" / "compile-cache"


def cache_folder(root: Path, device: torch.device) -> Path:
    """``root/<device name>-torch<version>``: artefacts only fit the same GPU and torch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in f"{name}-torch{torch.__version__}")
    return root / tag


class CompiledUNet:
    """Calls like the U-Net (``unet(x, t, audio, cache=, shallow=)``) and runs compiled passes where warmed up."""

    def __init__(self, unet: UNet3DConditionModel):
        self.unet = unet
        self.config = unet.config
        self._full = torch.compile(self._full_pass, dynamic=False, backend=BACKEND)
        self._shallow = torch.compile(self._shallow_pass, dynamic=False, backend=BACKEND)
        # (shallow, input shape) of every pass the warm-up ran compiled: the passes dynamo has graphs for.
        self._compiled: set[tuple[bool, tuple[int, ...]]] = set()
        self._warming = False

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _full_pass(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = DeepCache()
        noise = self.unet(x, t, audio, cache=cache).sample
        if cache.deep is None:  # a full pass given a cache always fills it
            raise RuntimeError("the U-Net's full pass left its DeepCache empty")
        return noise, cache.deep

    def _shallow_pass(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        cache = DeepCache()
        cache.deep = deep
        return self.unet(x, t, audio, cache=cache, shallow=True).sample

    def __call__(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, *, cache: DeepCache | None = None,
                 shallow: bool = False) -> UNet3DConditionOutput:
        key = (shallow, tuple(x.shape))
        if self._warming:
            self._compiled.add(key)
        elif key not in self._compiled:  # never warmed up: eager, without asking dynamo for a new graph
            return self.unet(x, t, audio, cache=cache, shallow=shallow)
        if shallow:
            if cache is None or cache.deep is None:  # as the eager U-Net refuses it
                raise ValueError("a shallow DeepCache pass needs a cache filled by a full pass")
            return UNet3DConditionOutput(self._shallow(x, t, audio, cache.deep))
        noise, deep = self._full(x, t, audio)
        if cache is not None:
            cache.deep = deep
        return UNet3DConditionOutput(noise)

    @contextmanager
    def warming_up(self) -> Iterator[CompiledUNet]:
        """While open, every call runs (and so compiles) its pass, which later calls of that shape then run too."""
        self._warming = True
        try:
            yield self
        finally:
            self._warming = False


def compile_vae(vae: AutoencoderKL) -> None:
    """Compile the VAE's encoder and decoder in place; dynamo traces each on its first call (the warm-up's). A call
    of another size (a video's last chunk) compiles again, or runs eagerly once the stance says so."""
    vae.encoder.compile(dynamic=False, backend=BACKEND)
    vae.decoder.compile(dynamic=False, backend=BACKEND)
