"""The LatentSync 3D U-Net: upstream key layout, parity with upstream, strict loading in every checkpoint format."""
from __future__ import annotations

import ast
import json
import logging
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from latentsync import InputError
from latentsync.config import config_path, load_config
from latentsync.models.unet import DeepCache, UNet3DConditionModel, UNetConfig
from latentsync.weights import load_unet, load_vae, remap_unet_keys, unet_config_for
from tiny_weights import UNET_MODEL

# A few-MB U-Net with every feature of the real one (audio cross-attention, motion modules, skip layout): the tiny
# test U-Net with a narrower audio width, and norm_eps written as a string as upstream's YAML configs do.
TINY = {**UNET_MODEL, "cross_attention_dim": 16, "norm_eps": "1e-5"}


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random and non-zero (the zero-initialised layers too), the position tables kept."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("pos_encoder.pe"):
            out[k] = v.clone()
        elif v.dim() == 1:  # norm scales around 1, biases around 0
            out[k] = (1.0 if k.endswith(".weight") else 0.0) + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = torch.randn(v.shape, generator=g) / math.sqrt(v[0].numel())
    return out


def tiny_inputs(batch: int = 1, frames: int = 3, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, TINY["in_channels"], frames, size, size, generator=g)
    audio = torch.randn(batch * frames, 50, TINY["cross_attention_dim"], generator=g)
    return sample, audio


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(UNet3DConditionModel.from_config(TINY))


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd) -> UNet3DConditionModel:
    model = UNet3DConditionModel.from_config(TINY)
    model.load_state_dict(tiny_sd)
    return model.eval()


def read_manifest(path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def meta_model(config_name: str) -> UNet3DConditionModel:
    with torch.device("meta"):
        return UNet3DConditionModel.from_config(load_config(config_path(config_name))["model"])


def layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


# ------------------------------------------------------------------------------------------ full-size layout
@pytest.mark.parametrize("config_name", ["unet/stage2.yaml", "unet/stage2_512.yaml"])
def test_full_size_keys_match_the_released_checkpoint(config_name, reference_dir):
    assert layout(meta_model(config_name)) == read_manifest(reference_dir / "unet_keys_v16.tsv")


def test_stage1_keys_match_the_no_motion_layout(reference_dir):
    assert layout(meta_model("unet/stage1.yaml")) == read_manifest(reference_dir / "unet_keys_stage1.tsv")


def test_full_size_parameter_counts():
    # the counts of upstream's own UNet3DConditionModel built from the same config
    model = meta_model("unet/stage2_512.yaml")
    assert sum(p.numel() for p in model.parameters()) == 1_267_099_844
    buffers = dict(model.named_buffers())
    assert len(buffers) == 40 and all(k.endswith("pos_encoder.pe") for k in buffers)
    sd = model.state_dict()
    motion = {k: v for k, v in sd.items() if ".motion_modules." in k}
    assert (len(motion), sum(v.numel() for v in motion.values())) == (560, 417_982_400)
    audio = {k: v for k, v in sd.items() if ".norm2." in k and "transformer_blocks" in k or ".attn2." in k}
    assert (len(audio), sum(v.numel() for v in audio.values())) == (112, 34_402_880)
    stage1 = meta_model("unet/stage1.yaml")
    assert (len(stage1.state_dict()), sum(p.numel() for p in stage1.parameters())) == (686, 849_962_244)


def test_decoder_only_and_mid_block_motion_options_are_honoured():
    cfg = load_config(config_path("unet/stage2.yaml"))["model"]
    with torch.device("meta"):
        decoder_only = UNet3DConditionModel.from_config({**cfg, "motion_module_decoder_only": True})
        with_mid = UNet3DConditionModel.from_config({**cfg, "motion_module_mid_block": True})
    keys = decoder_only.state_dict().keys()
    assert not any(k.startswith("down_blocks.") and ".motion_modules." in k for k in keys)
    assert any(k.startswith("up_blocks.") and ".motion_modules." in k for k in keys)
    assert any(k.startswith("mid_block.motion_modules.0.") for k in with_mid.state_dict())


# ----------------------------------------------------------------------------------------------- config
def test_config_reads_yaml_strings_and_lists():
    cfg = UNetConfig.from_dict(TINY)
    assert cfg.norm_eps == 1e-5 and isinstance(cfg.norm_eps, float)
    assert cfg.block_out_channels == (32, 32, 64, 64)
    assert cfg.motion_module_kwargs.num_transformer_block == 1
    assert cfg.heads() == (8, 8, 8, 8)


@pytest.mark.parametrize(
    "change, word",
    [({"block_out_chanels": [1]}, "block_out_chanels"), ({"use_linear_projection": True}, "use_linear_projection"),
     ({"mid_block_type": "UNetMidBlock3D"}, "mid_block_type")],
)
def test_config_rejects_unknown_or_unsupported_options(change, word):
    with pytest.raises(InputError, match=word):
        UNetConfig.from_dict({**TINY, **change})


# ----------------------------------------------------------------------------------------------- parity
def test_forward_matches_upstream_on_every_fixture_case(parity_dir):
    config = json.loads((parity_dir / "unet_config.json").read_text())
    meta = json.loads((parity_dir / "unet_meta.json").read_text())
    cases = load_file(parity_dir / "unet_cases.safetensors")
    unet = load_unet(config, parity_dir / "unet_state_dict.safetensors")
    assert sum(p.numel() for p in unet.parameters()) == meta["params"]
    failures = []
    for case in meta["cases"]:
        name = case["name"]
        sample = cases[f"{name}.sample"]
        assert list(sample.shape) == case["sample_shape"]
        with torch.no_grad():
            out = unet(sample, torch.tensor(case["timestep"]), cases[f"{name}.encoder_hidden_states"]).sample
        ref = cases[f"{name}.output"]
        assert out.shape == ref.shape
        err, tol = (out - ref).abs().max().item(), 1e-5 * max(1.0, ref.abs().max().item())
        print(f"{name}: max abs error {err:.3g} (tolerance {tol:.3g})")
        if not err <= tol:
            failures.append(f"{name}: {err:.3g} > {tol:.3g}")
    assert not failures, failures


# ------------------------------------------------------------------------------------------------ forward
def test_forward_shapes_and_integer_timestep(tiny_unet):
    sample, audio = tiny_inputs(batch=2, frames=3)
    with torch.no_grad():
        a = tiny_unet(sample, 451, audio).sample
        b = tiny_unet(sample, torch.tensor(451), audio).sample
    assert a.shape == (2, 4, 3, 8, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_latent_sizes_that_are_not_a_multiple_of_eight(tiny_unet):
    sample, audio = tiny_inputs(batch=1, frames=2, size=12)
    with torch.no_grad():
        assert tiny_unet(sample, 100, audio).sample.shape == (1, 4, 2, 12, 12)


def test_each_frame_hears_only_its_own_audio():
    # with per-frame GroupNorm and no motion modules nothing mixes frames, so audio row b·F+f may only move
    # output frame f of batch element b
    cfg = {**TINY, "use_motion_module": False, "use_inflated_groupnorm": True}
    unet = UNet3DConditionModel.from_config(cfg)
    unet.load_state_dict(random_state_dict(unet))
    sample, audio = tiny_inputs(batch=2, frames=3)
    changed = audio.clone()
    changed[3 + 1] += 1.0  # batch element 1, frame 1
    with torch.no_grad():
        delta = (unet(sample, 500, changed).sample - unet(sample, 500, audio).sample).abs().amax(dim=(1, 3, 4))
    assert delta[1, 1] > 1e-3
    delta[1, 1] = 0
    assert torch.all(delta == 0)


def test_shallow_deepcache_pass_reuses_the_full_pass_exactly(tiny_unet):
    sample, audio = tiny_inputs(batch=2, frames=3)
    cache = DeepCache()
    with torch.no_grad():
        full = tiny_unet(sample, 700, audio, cache=cache).sample
        assert cache.deep is not None
        again = tiny_unet(sample, 700, audio, cache=cache, shallow=True).sample
        other_t = tiny_unet(sample, 300, audio, cache=cache, shallow=True).sample
    torch.testing.assert_close(again, full, rtol=0, atol=0)  # same input: the recomputed branch is the same
    assert not torch.equal(other_t, full)  # the shallow branch does see the new timestep


def test_shallow_pass_without_a_filled_cache_is_an_error(tiny_unet):
    sample, audio = tiny_inputs()
    with pytest.raises(ValueError, match="full pass"):
        tiny_unet(sample, 10, audio, cache=DeepCache(), shallow=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(tiny_unet, tiny_sd, dtype, tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file(tiny_sd, str(path))
    unet = load_unet(TINY, path, dtype=dtype)
    assert {p.dtype for p in unet.parameters()} == {dtype}
    sample, audio = tiny_inputs(batch=2, frames=3)
    with torch.no_grad():
        out = unet(sample.to(dtype), torch.tensor(951), audio.to(dtype)).sample
        ref = tiny_unet(sample, torch.tensor(951), audio).sample
    assert out.dtype == dtype and out.shape == (2, 4, 3, 8, 8)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------------------------------ loading
def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_upstream_pt_and_safetensors_round_trip(tiny_unet, tiny_sd, tmp_path):
    torch.save({"global_step": 7, "state_dict": tiny_sd}, tmp_path / "latentsync_unet.pt")
    save_file(tiny_sd, str(tmp_path / "unet.safetensors"))
    torch.save(tiny_sd, tmp_path / "bare.pt")
    for name in ("latentsync_unet.pt", "unet.safetensors", "bare.pt"):
        model = load_unet(TINY, tmp_path / name)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        _assert_same_model(model, tiny_unet)


def test_legacy_non_zip_checkpoint_loads(tiny_unet, tiny_sd, tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": tiny_sd}, path, _use_new_zipfile_serialization=False)
    _assert_same_model(load_unet(TINY, path), tiny_unet)


def test_version_1_0_key_names_are_mapped(tiny_unet, tiny_sd, tmp_path):
    old = {}
    for k, v in tiny_sd.items():
        k = k.replace("transformer_blocks.0.norm2.", "transformer_blocks.0.audio_cross_attn.norm.")
        k = k.replace("transformer_blocks.0.attn2.", "transformer_blocks.0.audio_cross_attn.attn.")
        old[k] = v
    assert sum(".audio_cross_attn." in k for k in old) > 0
    assert remap_unet_keys(old).keys() == tiny_sd.keys()
    torch.save({"state_dict": old}, tmp_path / "v10.pt")
    _assert_same_model(load_unet(TINY, tmp_path / "v10.pt"), tiny_unet)


def test_missing_key_is_named(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    del sd["up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    torch.save({"state_dict": sd}, tmp_path / "u.pt")
    with pytest.raises(InputError, match=r"missing keys: 1 \(up_blocks\.3\.attentions\.0\.transformer_blocks\.0\."):
        load_unet(TINY, tmp_path / "u.pt")


def test_unexpected_key_is_named(tiny_sd, tmp_path):
    torch.save({"state_dict": {**tiny_sd, "mid_block.extra.weight": torch.zeros(3)}}, tmp_path / "u.pt")
    with pytest.raises(InputError, match=r"unexpected keys: 1 \(mid_block\.extra\.weight"):
        load_unet(TINY, tmp_path / "u.pt")


def test_misshaped_key_is_named(tiny_sd, tmp_path):
    sd = dict(tiny_sd)
    sd["conv_in.weight"] = torch.zeros(32, 9, 3, 3)  # a plain SD-1.5 style input layer
    torch.save({"state_dict": sd}, tmp_path / "u.pt")
    with pytest.raises(InputError, match=r"mis-shaped keys: 1 \(conv_in\.weight \(32, 9, 3, 3\)"):
        load_unet(TINY, tmp_path / "u.pt")


def test_wrong_config_for_checkpoint_is_an_input_error(tiny_sd, tmp_path):
    torch.save({"state_dict": tiny_sd}, tmp_path / "u.pt")
    with pytest.raises(InputError, match="does not match the model"):
        load_unet({**TINY, "use_motion_module": False}, tmp_path / "u.pt")


def test_load_unet_logs_the_resolution_of_its_config(tiny_sd, tmp_path, caplog):
    torch.save({"global_step": 7, "state_dict": tiny_sd}, tmp_path / "latentsync_unet.pt")
    cfg_path = tmp_path / "unet.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"resolution": 512}, "model": TINY}))
    with caplog.at_level(logging.INFO, logger="latentsync.weights"):
        load_unet(cfg_path, tmp_path / "latentsync_unet.pt")
    assert any("resolution 512 px" in r.getMessage() and str(cfg_path) in r.getMessage() for r in caplog.records)


def test_load_unet_missing_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        load_unet(TINY, tmp_path / "nope.pt")
    with pytest.raises(InputError, match="config not found"):
        load_unet(tmp_path / "nope.yaml", tmp_path / "nope.pt")


def test_meta_loading_leaves_no_meta_tensor(tiny_sd, tmp_path):
    save_file(tiny_sd, str(tmp_path / "u.safetensors"))
    model = load_unet(TINY, tmp_path / "u.safetensors")
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_unet_config_for_each_release():
    assert unet_config_for("1.5") == config_path("unet/stage2.yaml")
    assert unet_config_for("1.6") == config_path("unet/stage2_512.yaml")
    assert load_config(unet_config_for("1.6"))["data"]["resolution"] == 512
    assert load_config(unet_config_for("1.5"))["data"]["resolution"] == 256
    with pytest.raises(InputError, match="1.0"):
        unet_config_for("1.0")


# ---------------------------------------------------------------------------------------------------- VAE
def test_load_vae_from_a_local_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL

    tiny = AutoencoderKL(
        block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    tiny.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae", dtype=torch.float16)
    assert vae.config.scaling_factor == 0.18215 and vae.config.shift_factor == 0
    assert not vae.training and next(vae.parameters()).dtype == torch.float16
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(vae.state_dict()[k].float(), v.half().float(), rtol=0, atol=0)


def test_load_vae_missing_folder_names_it(tmp_path):
    with pytest.raises(InputError, match="sd-vae-ft-mse"):
        load_vae(tmp_path / "sd-vae-ft-mse")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="broken"):
        load_vae(tmp_path / "broken")
