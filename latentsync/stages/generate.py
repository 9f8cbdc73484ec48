"""Synthesis stage 2, the GPU work of a chunk: VAE encode → denoise → VAE decode, with the run's random draws.

One generator, seeded once per run, serves every draw in a fixed order: the noise shared by all frames (one draw
for the whole video, as upstream), then two VAE posterior samples (masked face, reference face) per chunk, drawn
whether or not the chunk shows the face, so each chunk's draws have a fixed place in the stream. ``skip`` makes
the same draws for a chunk without running the VAE, so rendering chunks ``[a, b)`` alone, or only the chunks of
some time ranges, gives exactly the frames those chunks get in a whole run, whatever the frames before show.
The generator is a CPU one whatever the device: CUDA's draws depend on the launch grid (the GPU's SM count), so
the same seed would draw differently on an H100 and an A100; drawn on the CPU and copied (about 1 MB a chunk),
they are the same everywhere.

The VAE encodes the masked and the reference crops in one call and decodes in slices of ``vae_slice`` frames,
fixed per device and resolution, so a part renders the same wherever it runs; the slices bound the decode's
activations, the peak of a run's memory.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from latentsync import audio as audio_mod
from latentsync.control import Cancel, StageClock, check_cancel
from latentsync.devices import Staging, upload, vae_slice
from latentsync.loader import Models, load_scheduler
from latentsync.options import OUTPUT_FPS, RunOptions
from latentsync.sampling import denoise
from latentsync.stages.align import crop_pixels
from latentsync.stages.cuda import made, take
from latentsync.stages.work import FeatureSource, Work
from latentsync.syncscore import SyncScorer
from latentsync.timeline import Chunk

if TYPE_CHECKING:
    # From its own module: to a type checker, diffusers' top-level names are its placeholders for a missing torch.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

DEEPCACHE_INTERVAL = 3  # upstream's DeepCacheSDHelper(cache_interval=3, cache_branch_id=0)


class _VaeConfig(Protocol):
    """The VAE settings the stage reads."""

    block_out_channels: Sequence[int]
    latent_channels: int
    scaling_factor: float
    shift_factor: float


def _vae_config(vae: AutoencoderKL) -> _VaeConfig:
    """``vae.config``, typed. diffusers declares it a dict; it is a ``FrozenDict``, which also sets every key as an
    attribute of the same value."""
    return cast(_VaeConfig, vae.config)


def sliced(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int | None) -> torch.Tensor:
    """``fn`` over ``x`` in slices of ``size`` along the first dimension (all at once for None), concatenated."""
    if size is None or len(x) <= size:
        return fn(x)
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


class GenerateStage:
    """Generates the mouth region of each chunk on the model's device, in chunk order: ``audio`` holds the Whisper
    features (a plan), ``fps`` the frame rate they are read at, ``options`` the run's seed and sampling."""

    def __init__(self, audio: FeatureSource, fps: float, options: RunOptions, models: Models, clock: StageClock,
                 cancel: Cancel | None = None):
        if options.seed is None:
            raise ValueError("the generate stage needs the run's seed (RunOptions.with_seed)")
        self.models, self.fps, self.options, self.clock, self.cancel = models, fps, options, clock, cancel
        self.audio = audio
        self._features: tuple[np.ndarray, torch.Tensor] | None = None
        R = models.resolution
        self.slice = vae_slice(models.device, R)
        self.generator = torch.Generator("cpu").manual_seed(options.seed)
        # One noise draw for the whole video, shared by every frame (as upstream), drawn before any chunk.
        self._noise = self._draw((1, 4, 1, R // 8, R // 8), models.dtype)
        self.staging = Staging(models.device)  # a chunk's draws and audio windows go up in one copy
        # The run's own scheduler: a multistep solver keeps its last outputs between steps, so no other run may step
        # it; the chunks run one after another and each starts with ``set_timesteps``, which clears that state. The
        # samplers draw no noise in their steps (DDIM at eta 0, DPM-Solver++ and UniPC are deterministic), so a part
        # of a video replays the chunks before it with ``skip`` alone, whatever the sampler.
        self.scheduler = load_scheduler(options.sampler)

    @property
    def features(self) -> torch.Tensor:
        """The Whisper features as a tensor, as the plan has them now: an open ``silence`` plan swaps in the padded
        audio's once pass 1 tells the output's length (rows already read are the same in both)."""
        if self._features is None or self._features[0] is not self.audio.features:
            self._features = (self.audio.features, torch.from_numpy(self.audio.features))
        return self._features[1]

    @property
    def noise(self) -> torch.Tensor:
        """The shared noise on the device, uploaded at first use: by the thread (and stream) that uses it."""
        if self._noise.device != self.models.device:
            self._noise = upload(self._noise, self.models.device)
        return self._noise

    def _draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The generator's next standard-normal tensor, drawn on the CPU in ``dtype`` (still on the CPU)."""
        return torch.randn(shape, generator=self.generator, dtype=dtype)

    def _latent_shape(self, frames: int) -> tuple[int, ...]:
        cfg = _vae_config(self.models.vae)
        down = 2 ** (len(cfg.block_out_channels) - 1)
        return (frames, cfg.latent_channels, self.models.resolution // down, self.models.resolution // down)

    def skip(self, chunk: Chunk) -> None:
        """Advance the generator exactly as generating ``chunk`` would (the VAE's two posterior samples)."""
        self._posterior_draws(len(chunk.src))

    def _posterior_draws(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two posterior draws of an ``n``-frame chunk, on the CPU: the masked face's, then the reference face's."""
        shape, dtype = self._latent_shape(n), self.models.vae.dtype
        masked = self._draw(shape, dtype)
        ref = self._draw(shape, dtype)
        return masked, ref

    def _posterior_noise(self, n: int) -> torch.Tensor:
        """The two posterior draws of an ``n``-frame chunk as one CPU batch (masked face's, then reference face's)."""
        return torch.cat(self._posterior_draws(n))

    def _encode(self, pixels: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the masked and of the whole crops, sampled from the VAE's posterior with ``noise`` (the two
        draws, on the device) as diffusers does, with both encodes in one batch."""
        vae = self.models.vae
        moments = sliced(lambda x: vae.encode(x).latent_dist.parameters, torch.cat([pixels * mask, pixels]),
                         self.slice)
        dist = DiagonalGaussianDistribution(moments)
        latents = dist.mean + dist.std * noise  # DiagonalGaussianDistribution.sample
        cfg = _vae_config(vae)
        masked, whole = ((latents - cfg.shift_factor) * cfg.scaling_factor).chunk(2)
        return masked, whole

    def __call__(self, work: Work) -> Work:
        chunk = work.chunk
        if work.pixels is None:  # a chunk passed through still takes its draws: later chunks keep their noise
            self.skip(chunk)
            return work
        models, opts, n = self.models, self.options, len(chunk.src)
        R = models.resolution
        mask = models.mask  # (1, R, R), 1 = keep
        take(work.pixels, work.ready)
        pixels = work.pixels
        audio_embeds = audio_mod.audio_windows(self.features, chunk.start, chunk.stop, self.fps).to(models.dtype)
        noise, audio_embeds = self.staging.upload([self._posterior_noise(n), audio_embeds])
        with self.clock("vae_encode"):
            mask_lat = F.interpolate(mask.expand(n, 1, R, R), size=(R // 8, R // 8))
            masked_lat, ref_lat = self._encode(pixels, mask, noise)
        with self.clock("denoise"):
            latents = denoise(
                models.unet, self.scheduler, self.noise.expand(-1, -1, n, -1, -1).clone(),
                _to_5d(mask_lat), _to_5d(masked_lat), _to_5d(ref_lat), audio_embeds,
                guidance_scale=opts.guidance_scale, num_inference_steps=opts.steps,
                deepcache_interval=DEEPCACHE_INTERVAL if opts.deepcache else 0, guided_steps=opts.guided_steps,
                step_callback=lambda _: check_cancel(self.cancel))
        with self.clock("vae_decode"):
            lat = latents[0].permute(1, 0, 2, 3)  # (f, 4, h, w)
            cfg = _vae_config(models.vae)
            decoded = sliced(lambda z: models.vae.decode(z).sample, lat / cfg.scaling_factor + cfg.shift_factor,
                             self.slice)
            # Outside the mouth mask the original aligned pixels come back exactly; only the mouth is generated.
            work.faces = decoded * (1 - mask) + pixels * mask
        work.pixels, work.ready = None, made(models.device)  # the crops are no longer needed: free them now
        return work


def _to_5d(x: torch.Tensor) -> torch.Tensor:
    """``(f, c, h, w)`` → ``(1, c, f, h, w)``, the U-Net's layout."""
    return x.permute(1, 0, 2, 3).unsqueeze(0)


@dataclass(frozen=True)
class _Features:
    """A warm-up's audio: the features of a plan, all zeros."""

    features: np.ndarray


# The guidance settings a warm-up generates with: any scale above 1 gives the U-Net a batch of 2 (unconditional and
# conditional), 1.0 a batch of 1; both are common in requests.
WARM_UP_GUIDANCE = (1.5, 1.0)


def warm_up(models: Models) -> float:
    """One whole chunk of blank faces per :data:`WARM_UP_GUIDANCE` through the VAE and the U-Net's full and
    shallow passes on the models' GPU thread, and a SyncNet window on the scoring thread; returns the seconds.

    Made as a run makes them (the crops through the align stage's upload and layout, this device's VAE slices, the
    stage's own draws and batches), so that what is planned or compiled here is what a run calls: cuDNN plans its
    convolutions per thread and shape at their first call, and dynamo compiles for the exact sizes, strides and
    dtypes it sees. The loader runs it on CUDA and for ``compile=True``.
    """
    t0 = time.perf_counter()
    f, size, encoder = models.num_frames, models.resolution, models.audio_encoder
    chunk = Chunk(index=0, start=0, src=tuple(range(f)), has_face=(True,) * f)
    features = np.zeros((2 * f, encoder.num_states, encoder.hidden_size), np.float32)  # a plan's, for 16 frames
    faces = np.zeros((f, size, size, 3), np.uint8)

    def generate() -> None:
        for guidance in WARM_UP_GUIDANCE:  # two steps: one full pass, one shallow (DeepCache)
            options = RunOptions(guidance_scale=guidance, inference_steps=2, seed=0, deepcache=True)
            pixels = crop_pixels(Staging(models.device), faces, models.dtype)
            GenerateStage(_Features(features), OUTPUT_FPS, options, models, StageClock())(Work(chunk, {}, pixels))
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)

    models.gpu.run(generate)
    if models.syncnet is not None and next(models.syncnet.parameters()).device == models.device:
        window = f + 2 * 5 + 1  # SyncNet's 16 frames at offsets ±5
        models.threads.score.run(SyncScorer(models.syncnet), np.zeros((window, size, size, 3), np.uint8),
                                 np.zeros(window * audio_mod.SAMPLE_RATE // int(OUTPUT_FPS), np.float32))
    return time.perf_counter() - t0
