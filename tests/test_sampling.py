"""The per-chunk denoising loop: upstream's DDIM + classifier-free guidance + DeepCache, checked against fixtures."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from safetensors.torch import load_file

from latentsync.loader import load_scheduler
from latentsync.models.unet import UNet3DConditionModel
from latentsync.sampling import denoise
from latentsync.weights import load_unet
from test_unet import TINY, random_state_dict


class Spy(torch.nn.Module):
    """Wraps a U-Net and records what the loop feeds it."""

    def __init__(self, unet: UNet3DConditionModel):
        super().__init__()
        self.unet = unet
        self.calls: list[dict] = []

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def device(self):
        return self.unet.device

    def forward(self, x, t, audio, *, cache=None, shallow=False):
        self.calls.append({"x": x.clone(), "t": int(t), "audio": audio.clone(), "shallow": shallow})
        return self.unet(x, t, audio, cache=cache, shallow=shallow)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these loops run hundreds of tiny-model passes: on a shared machine, OpenMP threads waiting for busy cores
    # make them 100× slower than one thread does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet3DConditionModel:
    unet = UNet3DConditionModel.from_config(TINY)
    unet.load_state_dict(random_state_dict(unet, seed=3))
    return unet.eval()


def chunk_inputs(frames: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat = lambda c: torch.randn(1, c, frames, 8, 8, generator=g)  # noqa: E731
    mask = (torch.rand(1, 1, frames, 8, 8, generator=g) > 0.5).float()
    return lat(4), mask, lat(4), lat(4), torch.randn(frames, 50, TINY["cross_attention_dim"], generator=g)


# --------------------------------------------------------------------------------------------- scheduler
def test_scheduler_is_upstreams_ddim(parity_dir):
    meta = json.loads((parity_dir / "denoise_meta.json").read_text())
    scheduler = load_scheduler()
    expected = {k: v for k, v in meta["scheduler_config"].items() if not k.startswith("_") and k != "skip_prk_steps"}
    assert {k: scheduler.config[k] for k in expected} == expected
    for run in meta["runs"]:
        scheduler.set_timesteps(run["num_inference_steps"])
        assert scheduler.timesteps.tolist() == run["timesteps"]


def test_the_default_scheduler_is_ddim():
    assert type(load_scheduler()) is DDIMScheduler


# ------------------------------------------------------------------------------------------ loop contract
def test_guidance_batches_uncond_zero_audio_first_and_channel_order(tiny_unet):
    spy = Spy(tiny_unet)
    latents, mask, masked, ref, audio = chunk_inputs()
    denoise(spy, load_scheduler(), latents, mask, masked, ref, audio, guidance_scale=1.5, num_inference_steps=2)
    first = spy.calls[0]
    x = first["x"]
    assert x.shape == (2, 13, 3, 8, 8)
    torch.testing.assert_close(x[:, :4], torch.cat([latents] * 2), rtol=0, atol=0)  # init_noise_sigma = 1
    torch.testing.assert_close(x[:, 4:5], torch.cat([mask] * 2), rtol=0, atol=0)
    torch.testing.assert_close(x[:, 5:9], torch.cat([masked] * 2), rtol=0, atol=0)
    torch.testing.assert_close(x[:, 9:13], torch.cat([ref] * 2), rtol=0, atol=0)
    assert torch.all(first["audio"][:3] == 0)
    torch.testing.assert_close(first["audio"][3:], audio, rtol=0, atol=0)
    scheduler = load_scheduler()
    scheduler.set_timesteps(2)
    assert [c["t"] for c in spy.calls] == scheduler.timesteps.tolist()


def test_no_guidance_at_scale_one(tiny_unet):
    spy = Spy(tiny_unet)
    latents, mask, masked, ref, audio = chunk_inputs()
    denoise(spy, load_scheduler(), latents, mask, masked, ref, audio, guidance_scale=1.0, num_inference_steps=2)
    assert all(c["x"].shape[0] == 1 for c in spy.calls)
    torch.testing.assert_close(spy.calls[0]["audio"], audio, rtol=0, atol=0)


def test_deepcache_schedule_restarts_every_chunk(tiny_unet):
    spy = Spy(tiny_unet)
    args = chunk_inputs()
    for _ in range(2):  # two chunks
        denoise(spy, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=8, deepcache_interval=3)
    full = [not c["shallow"] for c in spy.calls]
    per_chunk = [True, False, False, True, False, False, True, False]
    assert full == per_chunk * 2


def test_deepcache_changes_the_result_but_not_much(tiny_unet):
    args = chunk_inputs()
    plain = denoise(tiny_unet, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=6)
    cached = denoise(tiny_unet, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=6,
                     deepcache_interval=3)
    one = denoise(tiny_unet, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=6,
                  deepcache_interval=1)
    assert not torch.equal(plain, cached)
    torch.testing.assert_close(one, plain, rtol=0, atol=0)  # interval 1 = a full pass every step


def test_step_callback_sees_every_step_and_can_cancel(tiny_unet):
    seen = []
    denoise(tiny_unet, load_scheduler(), *chunk_inputs(), guidance_scale=1.5, num_inference_steps=4,
            step_callback=seen.append)
    assert seen == [0, 1, 2, 3]

    class Cancelled(Exception):
        pass

    def cancel(i: int) -> None:
        if i == 1:
            raise Cancelled

    spy = Spy(tiny_unet)
    with pytest.raises(Cancelled):
        denoise(spy, load_scheduler(), *chunk_inputs(), guidance_scale=1.5, num_inference_steps=4, step_callback=cancel)
    assert len(spy.calls) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_runs_in_the_unets_dtype(tiny_unet, dtype):
    unet = UNet3DConditionModel.from_config(TINY)
    unet.load_state_dict(tiny_unet.state_dict())
    unet = unet.to(dtype).eval()
    out = denoise(unet, load_scheduler(), *chunk_inputs(), guidance_scale=1.5, num_inference_steps=3,
                  deepcache_interval=3)
    assert out.dtype == dtype and out.shape == (1, 4, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_other_diffusers_schedulers_run_the_loop(tiny_unet, kind):
    """Schedulers whose ``step`` takes no ``eta`` run the same loop, at the timesteps they choose."""
    spy = Spy(tiny_unet)
    scheduler = load_scheduler(kind)
    assert type(scheduler) is kind
    out = denoise(spy, scheduler, *chunk_inputs(), guidance_scale=1.5, num_inference_steps=4, deepcache_interval=3)
    assert out.shape == (1, 4, 3, 8, 8) and torch.isfinite(out).all()
    expected = load_scheduler(kind)
    expected.set_timesteps(4)
    assert [c["t"] for c in spy.calls] == expected.timesteps.tolist()
    # the next chunk reuses the scheduler, as a run does: nothing of the first chunk's steps is carried over
    again = denoise(tiny_unet, scheduler, *chunk_inputs(), guidance_scale=1.5, num_inference_steps=4,
                    deepcache_interval=3)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- parity
def _denoise_chunks(unet, data, run, chunks) -> list[torch.Tensor]:
    outs, start = [], 0
    for n in chunks:
        s = slice(start, start + n)
        start += n
        outs.append(denoise(
            unet, load_scheduler(), data["init_latents"][:, :, s], data["mask"][:, :, s],
            data["masked_latents"][:, :, s], data["ref_latents"][:, :, s], data["audio_embeds"][s],
            guidance_scale=run["guidance_scale"], num_inference_steps=run["num_inference_steps"],
            deepcache_interval=run["deepcache_interval"],
        ))
    return outs


# The fixture chunks whose float32 trajectory is chaotic on random weights (measured: error 3.3e-2 with Δ 3.4e-2, and
# 6.4e-3 with Δ 1.9e-2). Only these may use the float32-vs-float64 bound, and never above CHAOTIC_CEILING × std.
CHAOTIC_CHUNKS = {("cfg_deepcache", 0), ("nocfg", 0)}
CHAOTIC_CEILING = 5e-3  # × the reference's std: 50× the fixture tolerance, still far below an error of order one


@pytest.mark.slow
def test_denoise_matches_upstream_on_every_fixture_run(parity_dir):
    """Every run, chunked as the metadata says, within 1e-4 × std of upstream's output.

    On random weights some 16-frame trajectories are chaotic: float32 rounding alone moves their result by more
    than that tolerance (our own float32 and float64 runs of the same maths differ by Δ), and no float32 port
    that is not bit-identical to the reference machine's kernels can land closer. For the chunks named in
    CHAOTIC_CHUNKS the bound is 2Δ, measured here, capped at CHAOTIC_CEILING × std; every other chunk must meet
    the tolerance. A wrong step, guidance or cache shows up as an error of order one.
    """
    meta = json.loads((parity_dir / "denoise_meta.json").read_text())
    data = load_file(parity_dir / "denoise_cases.safetensors")
    config = json.loads((parity_dir / "unet_config.json").read_text())
    unet = load_unet(config, parity_dir / "unet_state_dict.safetensors")
    chunks = meta["chunks"]
    assert sum(chunks) == data["init_latents"].shape[2]
    failures = []
    for run in meta["runs"]:
        ref = data[f"{run['name']}.output"]
        tol = 1e-4 * ref.std().item()
        outs = _denoise_chunks(unet, data, run, chunks)
        out = torch.cat(outs, dim=2)
        assert out.shape == ref.shape and out.dtype == torch.float32
        start = 0
        for i, (n, chunk) in enumerate(zip(chunks, outs, strict=True)):
            err = (chunk - ref[:, :, start:start + n]).abs().max().item()
            bound, note = tol, ""
            if err > tol and (run["name"], i) in CHAOTIC_CHUNKS:  # is float32 itself this imprecise on this chunk?
                inputs = {k: v[:, :, start:start + n] if v.dim() == 5 else v[start:start + n]
                          for k, v in data.items() if not k.endswith(".output")}
                exact = _denoise_chunks(unet.double(), inputs, run, [n])[0]
                unet.float()
                delta = (chunk.double() - exact).abs().max().item()
                ceiling = CHAOTIC_CEILING * ref.std().item()
                bound = min(max(tol, 2 * delta), ceiling)
                note = f", float32 vs float64 of our own maths {delta:.3g}, ceiling {ceiling:.3g}"
            print(f"{run['name']} chunk {i} ({n} frames): max abs error {err:.3g} (tolerance {tol:.3g}{note})")
            if not err <= bound:
                failures.append(f"{run['name']} chunk {i}: {err:.3g} > {bound:.3g}")
            start += n
    assert not failures, failures


# ------------------------------------------------------------------------------------- samplers, late guidance
def _library_loop(unet, scheduler, latents, mask, masked, ref, audio, *, guidance_scale, steps, guided_steps):
    """The loop written with diffusers' documented scheduler API only (``set_timesteps``, ``scale_model_input``,
    ``step`` with its own defaults), guidance on the first ``guided_steps`` steps: what ``denoise`` must compute."""
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        if i < guided_steps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            x = torch.cat([x, torch.cat([mask] * 2), torch.cat([masked] * 2), torch.cat([ref] * 2)], dim=1)
            uncond, cond = unet(x, t, torch.cat([torch.zeros_like(audio), audio])).sample.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        else:
            x = torch.cat([scheduler.scale_model_input(latents, t), mask, masked, ref], dim=1)
            noise = unet(x, t, audio).sample
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("guided_steps", [4, 2], ids=["guided-throughout", "guided-half"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_each_sampler_gives_the_latents_of_diffusers_own_loop(tiny_unet, sampler, guided_steps):
    args = chunk_inputs()
    ours = denoise(tiny_unet, load_scheduler(sampler), *args, guidance_scale=1.5, num_inference_steps=4,
                   guided_steps=guided_steps)
    theirs = _library_loop(tiny_unet, load_scheduler(sampler), *args, guidance_scale=1.5, steps=4,
                           guided_steps=guided_steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_sampler_names_build_their_diffusers_schedulers():
    kinds = {name: type(load_scheduler(name)) for name in ("ddim", "dpmpp_2m", "unipc")}
    assert kinds == {"ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
                     "unipc": UniPCMultistepScheduler}


def test_late_steps_run_the_conditional_half_alone(tiny_unet):
    spy = Spy(tiny_unet)
    latents, mask, masked, ref, audio = chunk_inputs()
    denoise(spy, load_scheduler("unipc"), latents, mask, masked, ref, audio, guidance_scale=1.5,
            num_inference_steps=5, guided_steps=2, deepcache_interval=3)
    assert [(c["x"].shape[0], c["shallow"]) for c in spy.calls] == [(2, False), (2, True), (1, True), (1, False),
                                                                     (1, True)]
    for late in spy.calls[2:]:
        torch.testing.assert_close(late["audio"], audio, rtol=0, atol=0)
        torch.testing.assert_close(late["x"][:, 4:], torch.cat([mask, masked, ref], dim=1), rtol=0, atol=0)


def test_no_guided_step_is_the_unguided_loop(tiny_unet):
    args = chunk_inputs()
    none = denoise(tiny_unet, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=4, guided_steps=0,
                   deepcache_interval=3)
    off = denoise(tiny_unet, load_scheduler(), *args, guidance_scale=1.0, num_inference_steps=4, deepcache_interval=3)
    torch.testing.assert_close(none, off, rtol=0, atol=0)


def test_the_conditional_half_of_guided_deep_features_serves_a_conditional_shallow_pass(tiny_unet):
    """What ``denoise`` relies on when guidance stops at a DeepCache shallow step: the batch rows are independent, so
    the second half of a guided full pass's features is what a conditional-only full pass would have left."""
    from latentsync.models.unet import DeepCache

    latents, mask, masked, ref, audio = chunk_inputs()
    x = torch.cat([latents, mask, masked, ref], dim=1)
    t = torch.tensor(500)
    guided, alone = DeepCache(), DeepCache()
    with torch.no_grad():
        tiny_unet(torch.cat([x] * 2), t, torch.cat([torch.zeros_like(audio), audio]), cache=guided)
        tiny_unet(x, t, audio, cache=alone)
    # up to float32 rounding, which differs between batch sizes (measured: 3e-6 × std)
    torch.testing.assert_close(guided.deep[1:], alone.deep, rtol=0, atol=1e-5 * alone.deep.std().item())


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_a_multistep_sampler_draws_no_noise_in_its_steps(tiny_unet, sampler):
    """A part of a video replays the random draws of the chunks before it without running them: that holds only
    while the sampler itself draws nothing (DDIM at eta 0 does not)."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    denoise(tiny_unet, load_scheduler(sampler), *chunk_inputs(), guidance_scale=1.5, num_inference_steps=3)
    assert torch.equal(torch.random.get_rng_state(), before)
