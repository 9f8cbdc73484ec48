"""The opt-in compiled U-Net: same call as the U-Net, compiled passes only for the warmed-up shape, same numbers.

Inductor itself takes minutes on a CPU, so these tests compile with dynamo's ``eager`` backend: everything but
the code generation (tracing, guards, the DeepCache hand-over between passes, the cache folder) is exercised.
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
    from latentsync.weights import load_scheduler

    compiled = CompiledUNet(unet)
    calls = {"full": 0, "shallow": 0}
    full, shallow = compiled._full, compiled._shallow
    compiled._full = lambda *a: (calls.__setitem__("full", calls["full"] + 1), full(*a))[1]
    compiled._shallow = lambda *a: (calls.__setitem__("shallow", calls["shallow"] + 1), shallow(*a))[1]
    g = torch.Generator().manual_seed(1)
    x = torch.zeros((2, 13, 16, 8, 8))
    compiled.warm_up(x, torch.tensor(999), torch.zeros((32, 10, 64)))
    calls.update(full=0, shallow=0)
    for frames in (16, 5):  # a whole chunk (compiled), a video's last short chunk (eager)
        args = _inputs(frames, g)
        kw = dict(guidance_scale=1.5, num_inference_steps=4, deepcache_interval=3)
        ref = denoise(unet, load_scheduler(), *args, **kw)
        out = denoise(compiled, load_scheduler(), *args, **kw)
        assert torch.equal(out, ref)
    assert calls == {"full": 2, "shallow": 2}  # steps 0 and 3 full, 1 and 2 shallow, for the 16-frame chunk only


def test_from_pretrained_compiles_with_a_cache_beside_the_weights(tmp_path, monkeypatch):
    import threading

    from latentsync.pipeline import LipSync

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    stances, warmed = [], []
    set_stance, warm_up = torch.compiler.set_stance, CompiledUNet.warm_up
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **kw: (stances.append(stance),
                                                                            set_stance(stance, **kw))[1])
    monkeypatch.setattr(CompiledUNet, "warm_up", lambda self, *a: (warmed.append(threading.current_thread().name),
                                                                  warm_up(self, *a))[1])
    folder, cfg = make_tiny_weights(tmp_path / "w", syncnet=False)
    try:
        pipe = LipSync.from_pretrained(folder, unet_config=cfg, device="cpu", compile=True, face_workers=0)
        # After the warm-up a new shape runs eagerly instead of compiling in the middle of a request.
        assert stances == ["default", "eager_on_recompile"]
    finally:
        set_stance("default")
    assert isinstance(pipe.models.unet, CompiledUNet) and pipe.models.unet._shapes == {(2, 13, 16, 8, 8)}
    vae = pipe.models.vae
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    assert warmed and warmed[0].startswith("latentsync-gpu")  # warmed up on the thread that will run it
    pipe.close()
    cache = folder / "compile-cache"
    assert [p.name for p in cache.iterdir()] == [f"cpu-torch{torch.__version__}".replace("+", "_")]


@torch.inference_mode()
def test_compiled_vae_gives_the_eager_vaes_numbers():
    from latentsync.models.compiled import compile_vae
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4).eval()
    x, z = torch.randn((4, 3, 16, 16)), torch.randn((2, 4, 8, 8))
    eager_moments, eager_pixels = vae.encode(x).latent_dist.parameters, vae.decode(z).sample
    compile_vae(vae, 16, encode_frames=4, decode_frames=2)
    assert torch.equal(vae.encode(x).latent_dist.parameters, eager_moments)
    assert torch.equal(vae.decode(z).sample, eager_pixels)
