"""The denoising loop of one chunk: DDIM (or another diffusers scheduler) with classifier-free guidance on audio and
optional DeepCache."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import torch

from latentsync.devices import upload
from latentsync.models.unet import DeepCache, UNet3DConditionOutput


class NoisePredictor(Protocol):
    """What the loop asks of a U-Net: ``UNet3DConditionModel`` or its compiled passes (``CompiledUNet``)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor, /, *, cache: DeepCache | None = None,
                 shallow: bool = False) -> UNet3DConditionOutput: ...


class Scheduler(Protocol):
    """What the loop asks of a scheduler: diffusers' DDIM (upstream's), DPM-Solver, UniPC and the like."""

    timesteps: torch.Tensor

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> Any: ...


@torch.no_grad()
def denoise(
    unet: NoisePredictor,
    scheduler: Scheduler,
    latents: torch.Tensor,
    mask: torch.Tensor,
    masked_latents: torch.Tensor,
    ref_latents: torch.Tensor,
    audio_embeds: torch.Tensor,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    deepcache_interval: int = 0,
    guided_steps: int | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoise one chunk as upstream does; returns the final latents ``(1, 4, f, h, w)`` in the U-Net's dtype.

    ``latents`` ``(1, 4, f, h, w)`` is the initial noise, ``mask`` ``(1, 1, f, h, w)`` (1 = keep),
    ``masked_latents``/``ref_latents`` ``(1, 4, f, h, w)``, ``audio_embeds`` ``(f, tokens, D)``.
    Guidance applies when ``guidance_scale > 1`` (all-zero audio is the unconditional input, batch order
    ``[uncond, cond]``) at the first ``guided_steps`` steps (None: every step); the later steps run the conditional
    half alone, a batch of 1 (a DeepCache shallow pass keeps the conditional half of the guided pass's features).
    With ``deepcache_interval = k > 1`` the full U-Net runs at step indices 0, k, 2k, … and
    only its shallowest branch in between. ``step_callback(i)`` runs after step ``i`` (it may raise to cancel).
    """
    device, dtype = unet.device, unet.dtype
    latents, mask, masked_latents, ref_latents, audio_embeds = (
        t.to(device=device, dtype=dtype) for t in (latents, mask, masked_latents, ref_latents, audio_embeds)
    )
    # The scheduler stays on the CPU: its step indexes its CPU ``alphas_cumprod`` with the timestep, which with a
    # device timestep is a device→host sync (six per step) that stalls the GPU and holds the GIL. The U-Net gets
    # its timestep as a device tensor, copied once per chunk (a Python int would make a compiled U-Net recompile
    # for every timestep).
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    device_timesteps = upload(scheduler.timesteps, device)
    guided_until = 0 if guidance_scale <= 1.0 else len(scheduler.timesteps) if guided_steps is None else guided_steps
    single = (mask, masked_latents, ref_latents, audio_embeds)
    # batch order [uncond, cond]; the unconditional input is all-zero audio
    pair = (*(torch.cat([t] * 2) for t in single[:3]), torch.cat([torch.zeros_like(audio_embeds), audio_embeds])
            ) if guided_until else single
    cache = DeepCache() if deepcache_interval > 1 else None  # a fresh cache per chunk: step 0 is always full
    step_options = _step_options(scheduler)

    for i, t in enumerate(scheduler.timesteps):
        guided = i < guided_until
        if i == guided_until and cache is not None and cache.deep is not None:
            cache.deep = cache.deep[1:].clone()  # the conditional half, for the shallow passes of batch 1
        mask, masked_latents, ref_latents, audio_embeds = pair if guided else single
        x = torch.cat([latents] * 2) if guided else latents
        x = scheduler.scale_model_input(x, t)
        # channel order of the 13 input channels: [noisy 4 | mask 1 | masked image 4 | reference 4]
        x = torch.cat([x, mask, masked_latents, ref_latents], dim=1)
        shallow = cache is not None and i % deepcache_interval != 0
        noise = unet(x, device_timesteps[i], audio_embeds, cache=cache, shallow=shallow).sample
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **step_options).prev_sample
        if step_callback is not None:
            step_callback(i)
    return latents


def _step_options(scheduler: Scheduler) -> dict[str, Any]:
    """Upstream's ``eta=0.0`` (DDIM without added noise) where the scheduler's ``step`` takes it; DPM-Solver, UniPC
    and others refuse arguments they do not know."""
    return {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
