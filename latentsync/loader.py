"""Loading every model a run needs from a folder laid out like upstream's ``checkpoints/``, the scheduler built
from its shipped config, and the opt-in compile."""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

# From their own modules: to a type checker, diffusers' top-level names are its placeholders for a missing torch.
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

from latentsync.align import load_mask
from latentsync.config import config_path, folder_configs, load_config
from latentsync.devices import GpuThread, StageThreads, pick_device, pick_dtype
from latentsync.errors import InputError
from latentsync.models.compiled import CompiledUNet, cache_folder, compile_vae, use_cache_dir
from latentsync.models.syncnet import StableSyncNet
from latentsync.models.unet import UNet3DConditionModel
from latentsync.models.whisper import AudioEncoder
from latentsync.sampling import Scheduler
from latentsync.syncscore import pin_flat
from latentsync.weights import load_syncnet, load_unet, load_vae, load_whisper, unet_config_for

log = logging.getLogger(__name__)

# The scheduler class of each sampler name of ``latentsync.options.SAMPLERS``; diffusers' defaults for each
# (DPM-Solver++ of order 2, UniPC's bh2 corrector) on the shipped noise schedule.
SCHEDULERS: dict[str, type[ConfigMixin]] = {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                                            "unipc": UniPCMultistepScheduler}


@dataclass(frozen=True)
class Models:
    """Every model a run needs, loaded once, with the sizes and the device and dtype they run at."""

    unet: UNet3DConditionModel | CompiledUNet
    vae: AutoencoderKL
    audio_encoder: AudioEncoder
    mask: torch.Tensor  # (1, R, R) mouth mask, 1 = keep, on ``device`` in ``dtype``
    resolution: int  # face crop size R
    num_frames: int  # frames the U-Net sees at once
    device: torch.device
    dtype: torch.dtype
    threads: StageThreads  # the stages' long-lived threads, on ``device``
    syncnet: StableSyncNet | None = None  # resident, or pinned on the CPU between scores; None without its checkpoint
    version: str | None = None

    @property
    def gpu(self) -> GpuThread:
        """The thread queueing the models' own work: generation, Whisper, warm-up."""
        return self.threads.generate


def load_models(weights_dir: Path, version: str, device: str | torch.device | None, dtype: str | torch.dtype | None,
                unet_config: str | Path | None, syncnet_config: str | Path | None) -> Models:
    """VAE, U-Net, Whisper, mask, sizes, SyncNet if present, on ``device`` (None: the best one here).

    SyncNet (fp32, 1.6 GB at full size) stays on the CPU until a score is computed: it is needed once per run,
    and the GPU's memory is the U-Net's.
    """
    if not weights_dir.is_dir():
        raise InputError(f"weights folder not found: {weights_dir}")
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    unet_config, syncnet_config = folder_configs(weights_dir, unet_config, syncnet_config)  # the folder's own
    unet_config = unet_config or unet_config_for(version)
    cfg = load_config(unet_config)
    data = cfg.get("data", {})
    resolution = int(data.get("resolution", 256))
    t0 = time.perf_counter()
    unet = load_unet(cfg["model"], weights_dir / "latentsync_unet.pt", device=device, dtype=dtype)
    vae = load_vae(weights_dir / "sd-vae-ft-mse", device=device, dtype=dtype)
    # Whisper runs in fp16 on CUDA as upstream does (its LayerNorms stay fp32 inside transformers), fp32 elsewhere.
    encoder = load_whisper(weights_dir / "whisper" / "tiny.pt", device=device,
                           dtype=torch.float16 if device.type == "cuda" else torch.float32)
    syncnet = None
    syncnet_path = weights_dir / "stable_syncnet.pt"
    if syncnet_path.is_file():
        syncnet_config = syncnet_config or config_path("syncnet/syncnet_16_pixel_attn.yaml")
        syncnet = load_syncnet(syncnet_config, syncnet_path, device="cpu", dtype=torch.float32)
        if device.type == "cuda":  # after the U-Net and the VAE: what is free now is what a run can use
            syncnet = place_syncnet(syncnet, device, resolution)
    else:
        log.warning("no %s: results will carry no sync score", syncnet_path)
    log.info("loaded LatentSync %s (U-Net config %s, %d px, %s %s) in %.1f s", version, unet_config, resolution,
             device, str(dtype).removeprefix("torch."), time.perf_counter() - t0)
    mask = load_mask(weights_dir / "mask.png", resolution).to(device=device, dtype=dtype)
    return Models(unet=unet, vae=vae, audio_encoder=encoder, mask=mask, resolution=resolution,
                  num_frames=int(data.get("num_frames", 16)), device=device, dtype=dtype,
                  threads=StageThreads.on(device), syncnet=syncnet, version=version)


def load_scheduler(kind: type[ConfigMixin] | str = DDIMScheduler) -> Scheduler:
    """A diffusers scheduler of class ``kind`` or of the sampler named ``kind`` (:data:`SCHEDULERS`; upstream's DDIM
    by default) on the noise schedule the U-Net was trained with, the shipped ``configs/scheduler_config.json``.
    About a millisecond: the generate stage builds one per run, so no two runs share a multistep solver's state."""
    kind = SCHEDULERS[kind] if isinstance(kind, str) else kind
    cfg = json.loads(config_path("scheduler_config.json").read_text())
    cfg.pop("skip_prk_steps", None)  # a PNDM option upstream's file carries; DDIM has no such setting
    return cast(Scheduler, kind.from_config(cfg))  # the instance: from_config returns a pair only when asked


def run_memory(resolution: int) -> int:
    """Bytes a run needs on the GPU beyond the weights, estimated: the U-Net's guided 16-frame activations and one
    VAE slice's decode, which grow with the crop's area, plus a fixed margin for the stages' buffers."""
    return int((1.5 + 4.0 * (resolution / 512) ** 2) * 2**30)


def syncnet_fits(free_bytes: int, syncnet_bytes: int, resolution: int) -> bool:
    """Whether SyncNet may stay on the GPU: the memory free after loading holds it and still a run's working memory."""
    return free_bytes - syncnet_bytes >= run_memory(resolution)


def place_syncnet(syncnet: StableSyncNet, device: torch.device, resolution: int) -> StableSyncNet:
    """SyncNet in fp16, resident on ``device`` when :func:`syncnet_fits`, else in one pinned CPU buffer (one fast
    copy up per scoring, none back). Crossing the bus twice per video in fp32 cost 1.6 GB each way."""
    syncnet = syncnet.half()
    size = sum(t.numel() * t.element_size() for t in [*syncnet.parameters(), *syncnet.buffers()])
    free, _ = torch.cuda.mem_get_info(device)
    if syncnet_fits(free, size, resolution):
        log.info("SyncNet stays on %s (fp16, %.2f GiB)", device, size / 2**30)
        return syncnet.to(device)
    log.info("SyncNet waits in pinned CPU memory: %.1f GiB free on %s", free / 2**30, device)
    return pin_flat(syncnet)


def compile_models(models: Models, cache_root: Path, warm_up: Callable[[Models], float]) -> Models:
    """``models`` with the U-Net swapped for its compiled passes and the VAE's encoder and decoder compiled, all
    compiled by ``warm_up(models)`` (the generate stage's: whole chunks as a run makes them, guided and not, full
    and shallow passes; it returns its seconds).

    After the warm-up, dynamo's stance is ``eager_on_recompile``: an input never seen (a short last chunk, a
    last VAE slice) runs eagerly instead of compiling for minutes in the middle of a request. Compiled artefacts
    are cached in ``cache_root/<gpu>-torch<version>``, so a later boot of the same machine type
    loads them instead of compiling again.
    """
    try:
        use_cache_dir(cache_folder(cache_root, models.device))
    except OSError as exc:  # a read-only weights folder: compile anyway, with inductor's own cache
        log.warning("cannot keep compiled kernels beside the weights (%s); a later boot compiles again", exc)
    if isinstance(models.unet, CompiledUNet):  # its passes would wrap compiled passes: a caller's mistake
        raise ValueError("the U-Net is compiled already: compile_models takes the models load_models returns")
    compiled = CompiledUNet(models.unet)
    compile_vae(models.vae)
    models = dataclasses.replace(models, unet=compiled)
    torch.compiler.set_stance("default")  # an earlier model's warm-up may have settled it: this one compiles
    with compiled.warming_up():
        seconds = warm_up(models)
    torch.compiler.set_stance("eager_on_recompile")
    log.info("compiled the U-Net and the VAE for whole %d-frame chunks in %.1f s", models.num_frames, seconds)
    return models
