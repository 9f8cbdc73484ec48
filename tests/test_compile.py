"""The opt-in compiled U-Net and VAE: same call as the eager ones, compiled passes only for the warmed-up shapes, same
numbers, and a warm-up that compiles exactly the graphs a real run then uses.

Inductor itself takes minutes on a CPU, so these tests compile with dynamo's ``eager`` backend (or a counting one
that runs graphs as ``eager`` does): everything but the code generation (tracing, guards, the DeepCache hand-over
between passes, the cache folder) is exercised.
"""
from __future__ import annotations

import pytest
import torch

import latentsync.models.compiled as compiled_mod
from latentsync.models.compiled import CompiledUNet
from latentsync.models.unet import UNet3DConditionModel
from latentsync.sampling import denoise
from tiny_weights import UNET_MODEL, make_tiny_weights


@pytest.fixture(autouse=True)
def eager_backend(monkeypatch):
    monkeypatch.setattr(compiled_mod, "BACKEND", "eager")


def _inputs(frames: int, g: torch.Generator):
    lat = lambda c: torch.randn((1, c, frames, 8, 8), generator=g)  # noqa: E731
    return lat(4), (lat(1) > 0).float(), lat(4), lat(4), torch.randn((frames, 10, 64), generator=g)


@torch.inference_mode()
def test_compiled_passes_equal_eager_and_skip_other_shapes():
    torch.manual_seed(0)
    unet = UNet3DConditionModel.from_config(UNET_MODEL).eval()
    for p in unet.parameters():  # the zero-initialised output conv would hide every difference
        p.add_(0.05 * torch.randn_like(p))
    from latentsync.loader import load_scheduler

    compiled = CompiledUNet(unet)
    calls = {"full": 0, "shallow": 0}
    full, shallow = compiled._full, compiled._shallow
    compiled._full = lambda *a: (calls.__setitem__("full", calls["full"] + 1), full(*a))[1]
    compiled._shallow = lambda *a: (calls.__setitem__("shallow", calls["shallow"] + 1), shallow(*a))[1]
    g = torch.Generator().manual_seed(1)
    kw = dict(guidance_scale=1.5, deepcache_interval=3)
    with compiled.warming_up():  # a guided 16-frame chunk, two steps: one full pass, one shallow
        denoise(compiled, load_scheduler(), *_inputs(16, g), num_inference_steps=2, **kw)
    assert compiled._compiled == {(False, (2, 13, 16, 8, 8)), (True, (2, 13, 16, 8, 8))}
    calls.update(full=0, shallow=0)
    for frames in (16, 5):  # a whole chunk (compiled), a video's last short chunk (eager)
        args = _inputs(frames, g)
        ref = denoise(unet, load_scheduler(), *args, num_inference_steps=4, **kw)
        out = denoise(compiled, load_scheduler(), *args, num_inference_steps=4, **kw)
        assert torch.equal(out, ref)
    assert calls == {"full": 2, "shallow": 2}  # steps 0 and 3 full, 1 and 2 shallow, for the 16-frame chunk only


def test_from_pretrained_compiles_with_a_cache_beside_the_weights(tmp_path, monkeypatch):
    import threading

    from latentsync.pipeline import LipSync

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    stances, warmed = [], []
    set_stance = torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **kw: (stances.append(stance),
                                                                            set_stance(stance, **kw))[1])
    # Dynamo compiles on the thread that first calls: the backend hears where the warm-up ran.
    monkeypatch.setattr(compiled_mod, "BACKEND", lambda gm, inputs: (warmed.append(threading.current_thread().name),
                                                                     gm.forward)[1])
    folder, cfg = make_tiny_weights(tmp_path / "w", syncnet=False)
    try:
        pipe = LipSync.from_pretrained(folder, unet_config=cfg, device="cpu", compile=True, face_workers=0)
        # After the warm-up a new shape runs eagerly instead of compiling in the middle of a request.
        assert stances == ["default", "eager_on_recompile"]
    finally:
        set_stance("default")
    # Both passes, for the U-Net's batch with guidance (2) and without (1).
    assert isinstance(pipe.models.unet, CompiledUNet)
    assert pipe.models.unet._compiled == {(shallow, (batch, 13, 16, 8, 8)) for shallow in (False, True)
                                          for batch in (1, 2)}
    vae = pipe.models.vae
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    assert warmed and all(name.startswith("latentsync-gpu") for name in warmed)  # the thread that will run them
    pipe.close()
    cache = folder / "compile-cache"
    assert [p.name for p in cache.iterdir()] == [f"cpu-torch{torch.__version__}".replace("+", "_")]


@torch.inference_mode()
def test_compiled_vae_gives_the_eager_vaes_numbers():
    from diffusers import AutoencoderKL

    from latentsync.models.compiled import compile_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    x, z = torch.randn((4, 3, 16, 16)), torch.randn((2, 4, 8, 8))
    eager_moments, eager_pixels = vae.encode(x).latent_dist.parameters, vae.decode(z).sample
    compile_vae(vae)
    assert torch.equal(vae.encode(x).latent_dist.parameters, eager_moments)
    assert torch.equal(vae.decode(z).sample, eager_pixels)


class CountingBackend:
    """A ``torch.compile`` backend that runs each graph as traced (like ``"eager"``) and counts, per graph, how
    often it runs; ``labels[i]`` names graph ``i`` (which pass or VAE half, and its batch)."""

    def __init__(self):
        self.runs: list[int] = []
        self.labels: list[tuple[str, int]] = []
        self.threads: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        import threading

        index = len(self.runs)
        self.runs.append(0)
        self.labels.append(_graph_label(gm, example_inputs))
        self.threads.append(threading.current_thread().name)
        forward = gm.forward

        def run(*args):
            self.runs[index] += 1
            return forward(*args)

        return run

    def snapshot(self) -> list[int]:
        return list(self.runs)


def _graph_label(gm: torch.fx.GraphModule, example_inputs: list) -> tuple[str, int]:
    """``("unet full" | "unet shallow" | "vae encode" | "vae decode", batch)`` from the graph's input names (dynamo
    names a placeholder after the argument it came from: ``x``, ``deep``, the VAE halves' ``sample``)."""
    names = [node.name.lower() for node in gm.graph.find_nodes(op="placeholder")]
    shapes = {name: tuple(t.shape) for name, t in zip(names, example_inputs, strict=True)
              if isinstance(t, torch.Tensor)}
    if "l_x_" in shapes:
        return ("unet shallow" if "l_deep_" in shapes else "unet full", shapes["l_x_"][0])
    if "l_sample_" in shapes:
        sample = shapes["l_sample_"]
        return ("vae encode" if sample[1] == 3 else "vae decode", sample[0])
    return ("other", 0)


@pytest.mark.parametrize("vae_frames", [None, 8], ids=["whole-batches", "gpu-slices"])
def test_every_graph_compiled_at_load_runs_in_a_real_run_and_none_compiles_there(tmp_path, monkeypatch, vae_frames):
    """A real tiny lip-sync of two whole chunks uses the graphs warmed up at load, for guidance on and off, with
    DeepCache; the VAE at the CPU's whole batches, and at a GPU's slices (8 frames a call, as CUDA at 256 px)."""
    import latentsync.stages.generate as generate_mod
    from latentsync.pipeline import LipSync
    from media_utils import face_clip, speech

    torch._dynamo.reset()  # graphs of earlier tests' modules must not stand in for this load's compilations
    counter = CountingBackend()
    monkeypatch.setattr(compiled_mod, "BACKEND", counter)
    if vae_frames is not None:
        monkeypatch.setattr(generate_mod, "vae_slice", lambda device, resolution: vae_frames)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the load sets it: undone after the test
    folder, cfg = make_tiny_weights(tmp_path / "w", syncnet=False)
    # 1.2 s of speech: 60 Whisper rows → 32 output frames, two whole 16-frame chunks.
    clip, audio = face_clip(tmp_path / "clip.mp4", 40), speech(tmp_path / "speech.wav", 1.2)
    pipe = None
    try:
        pipe = LipSync.from_pretrained(folder, unet_config=cfg, device="cpu", compile=True, face_workers=0)
        at_load = counter.snapshot()
        encode, decode = ("vae encode", vae_frames or 32), ("vae decode", vae_frames or 16)
        assert set(counter.labels) == {encode, decode, *((name, batch) for name in ("unet full", "unet shallow")
                                                          for batch in (1, 2))}, counter.labels
        assert all(name.startswith("latentsync-gpu") for name in counter.threads)  # the thread that runs them
        # Back to the default stance: an input the warm-up missed now compiles (and is counted here) instead of
        # silently running eagerly.
        torch.compiler.set_stance("default")
        ran_anywhere: set[int] = set()
        # Guidance until half of 4 steps: full and shallow at batch 2, then shallow (on the guided features'
        # conditional half) and full at batch 1.
        for guidance, until, steps, batches in ((1.5, 1.0, 3, (2,)), (1.0, 1.0, 3, (1,)), (1.5, 0.5, 4, (2, 1))):
            before = counter.snapshot()
            result = pipe.lipsync(clip, audio, tmp_path / f"out{guidance}-{until}.mp4", seed=3, inference_steps=steps,
                                  guidance_scale=guidance, guidance_until=until, deepcache=True)
            assert result.frames == 32
            assert len(counter.runs) == len(before), f"compiled during the run: {counter.labels[len(before):]}"
            ran = {i for i, n in enumerate(counter.runs) if n > before[i]}
            ran_anywhere |= ran
            expected = {*((name, b) for name in ("unet full", "unet shallow") for b in batches), encode, decode}
            assert {counter.labels[i] for i in ran} == expected, (guidance, until, counter.labels, counter.runs)
        missed = [counter.labels[i] for i in range(len(at_load)) if i not in ran_anywhere]
        assert not missed, f"compiled at load, never run: {missed}"
    finally:
        torch.compiler.set_stance("default")
        if pipe is not None:
            pipe.close()
