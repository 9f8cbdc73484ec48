"""The GPU path checked on the CPU through a CUDA stand-in as strict as torch (tests/fake_cuda.py): the default
device, which device's stream an event marks, the stages' long-lived threads and their stream priorities, the CPU
generator's draws, a denoising loop that never reads a device tensor back, uploads per chunk, and the memory
rules (VAE slices, SyncNet's place and its one pinned buffer, the allocator setting)."""
from __future__ import annotations

import ast
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentsync.devices import HIGH, LOW, MID, GpuThread, StageThreads, pick_device, use_expandable_segments, vae_slice
from latentsync.loader import load_scheduler, run_memory, syncnet_fits
from latentsync.sampling import denoise
from latentsync.stages import cuda as cuda_mod

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- the stand-in
def test_the_default_device_is_the_current_cuda_device_with_its_index(two_fake_gpus):
    assert pick_device(None) == torch.device("cuda", 0) == torch.zeros(1, device="cuda").device
    assert pick_device("cuda") == torch.device("cuda", 0)
    torch.cuda.set_device(1)
    assert pick_device(None) == torch.device("cuda", 1) == torch.zeros(1, device="cuda").device
    gpu = GpuThread(pick_device(None))
    try:  # torch.cuda.set_device refuses an index-less device: the thread would never start
        assert gpu.run(torch.cuda.current_device) == 1
    finally:
        gpu.close()


# Each torch.cuda name the library calls, with a call torch itself refuses: the stand-in must refuse it too.
_REFUSED = {
    "set_device": lambda: torch.cuda.set_device(torch.device("cuda")),
    "Stream": lambda: torch.cuda.Stream(torch.device("cpu")),
    "Event": lambda: _recorded_on(torch.cuda.Event(), torch.cuda.Stream(0)).record(torch.cuda.Stream(1)),
    "current_stream": lambda: torch.cuda.current_stream(torch.device("cpu")),
    "set_stream": lambda: torch.cuda.set_stream(object()),
    "stream": lambda: torch.cuda.stream(object()).__enter__(),
    "synchronize": lambda: torch.cuda.synchronize("cpu"),
    "mem_get_info": lambda: torch.cuda.mem_get_info("cpu"),
    "get_device_properties": lambda: torch.cuda.get_device_properties(5),
    "get_device_name": lambda: torch.cuda.get_device_name("cpu"),
    "get_device_capability": lambda: torch.cuda.get_device_capability(7),
    "device_count": None,  # takes no argument
    "is_available": None,
    "current_device": None,
    "empty_cache": None,
}


def _recorded_on(event, stream):
    event.record(stream)
    return event


def _library_cuda_names() -> set[str]:
    """Every ``torch.cuda.X`` the library and predict.py name, read from their source."""
    names = set()
    for path in [*sorted((REPO / "latentsync").rglob("*.py")), REPO / "predict.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "cuda" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "torch"):
                names.add(node.attr)
    return names


def test_every_torch_cuda_name_the_library_uses_has_a_strict_stand_in(two_fake_gpus):
    used = _library_cuda_names()
    assert {"set_device", "Stream", "Event", "current_stream", "mem_get_info"} <= used  # the scan reads the source
    missing = used - set(_REFUSED)
    assert not missing, f"torch.cuda names without a strict stand-in check: {sorted(missing)}"
    for name in used:
        assert getattr(torch.cuda, name).__module__.startswith("torch.cuda"), f"{name} is torch's own code"
        refused = _REFUSED[name]
        if refused is not None:
            with pytest.raises((ValueError, RuntimeError, AssertionError, TypeError, AttributeError)):
                refused()
                pytest.fail(f"torch.cuda.{name}: the stand-in accepted what torch refuses")


def test_a_cpu_tensor_beside_a_cuda_one_fails_as_on_a_gpu(fake_cuda):
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(3)
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    assert (x + torch.tensor(2.0)).device == x.device  # a 0-dim CPU scalar is fine, as on a GPU
    x[[0, 2]]
    assert [c.hidden for c in fake_cuda.seen.uploads][-1]  # an index list goes up behind the caller's back


def test_events_are_recorded_on_the_stages_own_device(two_fake_gpus):
    device = torch.device("cuda", 1)
    for _ in range(3):
        cuda_mod.made(device)
    assert [d for d, _ in two_fake_gpus.seen.events] == [1, 1, 1]  # not cuda:0, where nothing of this run is queued
    assert cuda_mod.made(torch.device("cpu")) is None


def test_each_stage_thread_queues_on_its_own_stream_align_and_paste_above_the_unet_scoring_below(fake_cuda):
    threads = StageThreads.on(torch.device("cuda", 0))
    try:
        current = {name: getattr(threads, name).run(torch.cuda.current_stream)
                   for name in ("align", "generate", "paste", "score")}
    finally:
        threads.close()
    assert len({s.stream_id for s in current.values()}) == 4  # four streams, none the default one
    priority = {name: fake_cuda.priority_of(stream) for name, stream in current.items()}
    assert priority == {"align": HIGH, "paste": HIGH, "generate": MID, "score": LOW}
    assert HIGH < MID < LOW == 0  # CUDA serves lower numbers first; 0 is the default stream's and the lowest


def test_the_gpu_thread_switches_to_its_device_once_and_lives_across_calls(two_fake_gpus):
    gpu = GpuThread(torch.device("cuda", 1))
    try:
        names = {gpu.run(lambda: threading.current_thread().name) for _ in range(3)}
        assert gpu.run(torch.is_inference_mode_enabled)
        assert gpu.run(lambda: gpu.run(lambda: 7)) == 7  # a call from the thread itself runs at once
        assert gpu.run(torch.cuda.current_device) == 1
    finally:
        gpu.close()
    assert len(names) == 1 and names.pop().startswith("latentsync-gpu")
    assert [d for _, d in two_fake_gpus.seen.set_devices] == [1]
    assert two_fake_gpus.seen.set_devices[0][0].startswith("latentsync-gpu")


def test_a_closed_gpu_thread_starts_again_on_the_next_call():
    gpu = GpuThread(torch.device("cpu"))
    first = gpu.run(threading.get_ident)
    gpu.close()
    assert not any(t.ident == first for t in threading.enumerate())  # the first thread ended
    assert gpu.run(lambda: 1 + 1) == 2
    gpu.close()


# --------------------------------------------------------------------------------------------- random draws
def _stage(device: str, seed: int = 11):
    from latentsync.options import RunOptions
    from latentsync.stages.generate import GenerateStage

    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 8), latent_channels=4), dtype=torch.float32)
    models = SimpleNamespace(resolution=16, device=torch.device(device), dtype=torch.float32, vae=vae)
    audio = SimpleNamespace(features=np.zeros((4, 2, 3), np.float32))
    return GenerateStage(audio, 25.0, RunOptions(seed=seed), models, clock=None)


def test_draws_come_from_a_cpu_generator_in_a_fixed_order_whatever_the_device():
    stage = _stage("meta")  # a device whose values cannot even be read: the draws still happen on the CPU
    assert stage.generator.device.type == "cpu" and stage.noise.device.type == "meta"
    g = torch.Generator().manual_seed(11)
    noise = torch.randn((1, 4, 1, 2, 2), generator=g)
    masked, ref = torch.randn((5, 4, 8, 8), generator=g), torch.randn((5, 4, 8, 8), generator=g)
    cpu = _stage("cpu")
    assert torch.equal(cpu.noise, noise)
    assert torch.equal(cpu._posterior_noise(5), torch.cat([masked, ref]))  # masked face's draw, then reference's


def test_skip_replays_the_draws_of_a_chunk():
    from latentsync.timeline import Chunk

    whole, part = _stage("cpu"), _stage("cpu")
    whole._posterior_noise(16)  # chunk 0 generated
    chunk = Chunk(index=0, start=0, src=list(range(16)), has_face=[True] * 16)
    part.skip(chunk)  # chunk 0 skipped
    assert torch.equal(whole._posterior_noise(16), part._posterior_noise(16))


def test_a_chunk_without_the_face_still_takes_its_place_in_the_random_stream():
    """So a chunk's draws do not depend on what earlier frames show: a ranged run need not look at them."""
    from latentsync.timeline import Chunk

    faceless, with_face = _stage("cpu"), _stage("cpu")
    faceless.skip(Chunk(index=0, start=0, src=tuple(range(16)), has_face=(False,) * 16))
    with_face.skip(Chunk(index=0, start=0, src=tuple(range(16)), has_face=(True,) * 16))
    assert torch.equal(faceless._posterior_noise(16), with_face._posterior_noise(16))


# ------------------------------------------------------------------------------------------- denoising loop
class MetaUNet:
    """A U-Net stand-in on the meta device: any read of a device value (``.item()``, ``bool``, indexing the
    scheduler's CPU table with it) raises there, as a host sync would stall a GPU."""

    device, dtype = torch.device("meta"), torch.float16

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, audio, *, cache=None, shallow=False):
        self.calls.append((x.device, x.dtype, t.device, t.dtype, audio.device, audio.dtype))
        return SimpleNamespace(sample=torch.empty_like(x[:, :4]))


def test_the_loop_never_reads_a_device_tensor_and_feeds_the_unet_device_tensors():
    unet, scheduler = MetaUNet(), load_scheduler()
    lat = lambda c: torch.zeros((1, c, 3, 4, 4), device="meta")  # noqa: E731
    out = denoise(unet, scheduler, lat(4), lat(1), lat(4), lat(4), torch.zeros((3, 5, 8), device="meta"),
                  guidance_scale=1.5, num_inference_steps=4, deepcache_interval=3)
    assert out.device.type == "meta" and out.dtype == torch.float16
    assert scheduler.timesteps.device.type == "cpu"
    meta, half = torch.device("meta"), torch.float16
    assert unet.calls == [(meta, half, meta, torch.int64, meta, half)] * 4


def _old_denoise(unet, scheduler, latents, mask, masked_latents, ref_latents, audio_embeds, *, guidance_scale,
                 num_inference_steps):
    """The loop as it was before the scheduler stayed on the CPU (without DeepCache), for comparison."""
    scheduler.set_timesteps(num_inference_steps, device=unet.device)
    audio_embeds = torch.cat([torch.zeros_like(audio_embeds), audio_embeds])
    mask, masked_latents, ref_latents = (torch.cat([t] * 2) for t in (mask, masked_latents, ref_latents))
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        x = torch.cat([x, mask, masked_latents, ref_latents], dim=1)
        uncond, cond = unet(x, t, audio_embeds).sample.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents, eta=0.0).prev_sample
    return latents


@torch.inference_mode()
def test_the_loop_gives_the_old_loops_latents_bit_for_bit():
    from latentsync.models.unet import UNet3DConditionModel
    from test_sampling import chunk_inputs
    from test_unet import TINY, random_state_dict

    unet = UNet3DConditionModel.from_config(TINY)
    unet.load_state_dict(random_state_dict(unet, seed=5))
    unet.eval()
    args = chunk_inputs(frames=3, seed=2)
    new = denoise(unet, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=3)
    old = _old_denoise(unet, load_scheduler(), *args, guidance_scale=1.5, num_inference_steps=3)
    assert torch.equal(new, old)


# ---------------------------------------------------------------------------------------------------- align
def test_a_chunk_uploads_its_matrices_once_and_its_windows_as_uint8(monkeypatch):
    from latentsync.align import FaceAligner

    uploads = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        if any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs:
            uploads.append((tuple(self.shape), self.dtype))
        return to(self, *args, **kwargs)

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for _ in range(4)]
    aligner = FaceAligner(64)
    matrices = [aligner.matrix(np.array([[60, 50], [100, 50], [80, 75]]) + k) for k in range(4)]
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    aligner.warp_batch(frames, matrices)
    warp = list(uploads)
    uploads.clear()
    aligner.restore_batch(frames, torch.zeros((4, 3, 64, 64)), matrices)
    for calls in (warp, uploads):
        assert [s for s, _ in calls if s[-2:] == (2, 3)] == [(4, 2, 3)]  # one (n, 2, 3) upload per chunk
        windows = [d for s, d in calls if len(s) == 3 and s[-1] == 3 and s[-2:] != (2, 3)]
        assert len(windows) == 4 and set(windows) == {torch.uint8}  # frame windows go up as uint8


# ---------------------------------------------------------------------------------------------------- memory
def test_vae_slices_are_fixed_per_device_and_resolution():
    assert vae_slice(torch.device("cuda", 1), 512) == 4 and vae_slice(torch.device("cuda"), 256) == 8
    assert vae_slice(torch.device("cpu"), 512) is None  # one call per batch: the CPU's frames stay as they were


def test_sliced_calls_cover_the_batch_in_order():
    from latentsync.stages.generate import sliced

    seen = []
    x = torch.arange(10.0)
    out = sliced(lambda part: (seen.append(len(part)), part * 2)[1], x, 4)
    assert torch.equal(out, x * 2) and seen == [4, 4, 2]
    assert torch.equal(sliced(lambda part: part + 1, x, None), x + 1)


def test_syncnet_stays_on_the_gpu_only_with_room_for_a_run_beside_it():
    gib = 2**30
    assert run_memory(512) > run_memory(256) > 0
    assert syncnet_fits(20 * gib, gib, 512)  # an H100 after loading 1.6
    assert not syncnet_fits(run_memory(512) + gib // 2, gib, 512)  # a 12 GB card: pinned CPU copy instead
    assert syncnet_fits(run_memory(256) + gib, gib, 256)


def test_scores_while_rendering_where_syncnet_lives_with_the_run():
    from latentsync.stages.score import scores_while_rendering

    net = torch.nn.Linear(2, 2)
    assert scores_while_rendering(SimpleNamespace(syncnet=net, device=torch.device("cpu")))
    assert not scores_while_rendering(SimpleNamespace(syncnet=net, device=torch.device("cuda", 0)))
    assert not scores_while_rendering(SimpleNamespace(syncnet=None, device=torch.device("cpu")))


def test_expandable_segments_unless_the_user_set_the_allocator():
    env: dict[str, str] = {}
    use_expandable_segments(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    use_expandable_segments(mine)
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}


@pytest.mark.parametrize("door", ["latentsync.cli", "latentsync.batch.command", "predict"])
def test_every_front_door_sets_the_allocator(door):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / (door.replace(".", "/") + ".py")
    assert "use_expandable_segments()" in path.read_text()  # called before the door loads any model


def test_uploads_to_a_gpu_go_through_pinned_memory_without_blocking(monkeypatch):
    from latentsync.devices import upload

    seen = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (seen.append("pinned"), self)[1])
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: (seen.append((a, kw)), self)[1])
    upload(torch.zeros(3), torch.device("cuda", 1))
    assert seen == ["pinned", ((torch.device("cuda", 1),), {"non_blocking": True})]
    seen.clear()
    upload(torch.zeros(3), torch.device("cpu"))
    assert seen == [((torch.device("cpu"),), {})]  # the CPU: a plain copy, no pinning


def test_segment_renders_ask_cuda_for_deterministic_kernels(monkeypatch):
    from latentsync.devices import make_deterministic

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    env: dict[str, str] = {}
    make_deterministic(env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    mine = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    make_deterministic(mine)
    assert mine == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the user's own setting stays
    source = (REPO / "latentsync" / "batch" / "worker.py").read_text()
    assert source.index("make_deterministic()") < source.index("settings.load()")  # before cuBLAS starts
