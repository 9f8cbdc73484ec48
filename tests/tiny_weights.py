"""Tiny random checkpoints written in the exact upstream formats, for end-to-end tests of the real loading code.

The folder mirrors upstream's ``checkpoints/``: ``latentsync_unet.pt`` ({"global_step", "state_dict"}),
``whisper/tiny.pt`` (OpenAI's {"dims", "model_state_dict"}, decoder keys included), ``stable_syncnet.pt``
({"state_dict"}), ``sd-vae-ft-mse/`` (a diffusers folder) and ``mask.png``. Only the widths are small. It describes
itself as any folder of other weights may: ``weights.txt`` (its manifest), ``unet.yaml`` and ``syncnet.yaml``, so
``--weights-dir FOLDER`` alone runs on it.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
import yaml

RESOLUTION = 64  # face crops of 64 px → 8×8 latents: the smallest size the VAE's ×8 downscale allows comfortably
AUDIO_DIM = 64  # Whisper width; the U-Net's cross_attention_dim follows it

UNET_MODEL = {
    "act_fn": "silu", "add_audio_layer": True, "attention_head_dim": 8, "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False, "cross_attention_dim": AUDIO_DIM,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 13, "layers_per_block": 1,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 16, "out_channels": 4, "sample_size": 8,
    "resnet_time_scale_shift": "default", "use_motion_module": True, "motion_module_resolutions": [1, 2, 4, 8],
    "motion_module_mid_block": False, "motion_module_decoder_only": False, "motion_module_type": "Vanilla",
    "motion_module_kwargs": {
        "num_attention_heads": 8, "num_transformer_block": 1,
        "attention_block_types": ["Temporal_Self", "Temporal_Self"],
        "temporal_position_encoding": True, "temporal_position_encoding_max_len": 24, "temporal_attention_dim_div": 1,
        "zero_initialize": True,
    },
}

# StableSyncNet's GroupNorms have 32 groups, so every width is a multiple of 32.
SYNCNET_MODEL = {
    "audio_encoder": {"in_channels": 1, "block_out_channels": [32, 32, 32, 32, 32, 32, 64],
                      "downsample_factors": [[2, 1], 2, 2, 1, 2, 2, [2, 3]], "attn_blocks": [0, 0, 0, 1, 1, 0, 0],
                      "dropout": 0.0},
    "visual_encoder": {"in_channels": 48, "block_out_channels": [32, 32, 32, 32, 32, 32, 64, 64],
                       "downsample_factors": [[1, 2], 2, 2, 2, 2, 2, 2, 2], "attn_blocks": [0, 0, 0, 0, 1, 1, 0, 0],
                       "dropout": 0.0},
}


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every tensor random and non-zero, so zero-initialised layers take part too."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif v.dim() == 1 and "norm" in k and k.endswith(".weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif v.dim() == 1:
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = torch.randn(v.shape, generator=g) * (0.5 / math.sqrt(v[0].numel()))
    return out


def write_unet(folder: Path, seed: int = 0) -> Path:
    """Write ``latentsync_unet.pt`` and its upstream-schema config ``unet.yaml``; return the config path."""
    from latentsync.models.unet import UNet3DConditionModel

    cfg_path = folder / "unet.yaml"
    cfg = {"data": {"num_frames": 16, "resolution": RESOLUTION, "mask_image_path": "mask.png",
                    "audio_feat_length": [2, 2], "audio_sample_rate": 16000, "video_fps": 25},
           "model": UNET_MODEL}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    unet = UNet3DConditionModel.from_config(UNET_MODEL)
    sd = _randomize(unet, seed)
    # Keep the temporal position encoding a real sinusoid table: it is a buffer, not a learned weight.
    for k, v in unet.state_dict().items():
        if k.endswith("pos_encoder.pe"):
            sd[k] = v.clone()
    torch.save({"global_step": 1, "state_dict": sd}, folder / "latentsync_unet.pt")
    return cfg_path


def write_whisper(folder: Path, seed: int = 1) -> Path:
    """Write ``whisper/tiny.pt`` in OpenAI's format (4 layers as tiny, narrower), decoder keys included."""
    g = torch.Generator().manual_seed(seed)
    d, layers, ctx, mels = AUDIO_DIM, 4, 1500, 80
    dims = {"n_mels": mels, "n_audio_ctx": ctx, "n_audio_state": d, "n_audio_head": 2, "n_audio_layer": layers,
            "n_vocab": 100, "n_text_ctx": 8, "n_text_state": d, "n_text_head": 2, "n_text_layer": 1}

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1 / math.sqrt(shape[-1])
        return (torch.randn(shape, generator=g) * scale).half()

    pos = torch.arange(ctx)[:, None] * torch.exp(-math.log(10000) * torch.arange(d // 2) / (d // 2 - 1))[None]
    sd = {"encoder.conv1.weight": rnd(d, mels, 3, scale=0.1), "encoder.conv1.bias": rnd(d, scale=0.1),
          "encoder.conv2.weight": rnd(d, d, 3, scale=0.05), "encoder.conv2.bias": rnd(d, scale=0.1),
          "encoder.positional_embedding": torch.cat([pos.sin(), pos.cos()], 1).half(),
          "encoder.ln_post.weight": (1 + rnd(d, scale=0.1)).half(), "encoder.ln_post.bias": rnd(d, scale=0.1)}
    for i in range(layers):
        b = f"encoder.blocks.{i}."
        for name in ("query", "key", "value", "out"):
            sd[b + f"attn.{name}.weight"] = rnd(d, d)
            if name != "key":
                sd[b + f"attn.{name}.bias"] = rnd(d, scale=0.1)
        for ln in ("attn_ln", "mlp_ln"):
            sd[b + f"{ln}.weight"] = (1 + rnd(d, scale=0.1)).half()
            sd[b + f"{ln}.bias"] = rnd(d, scale=0.1)
        sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"] = rnd(4 * d, d), rnd(4 * d, scale=0.1)
        sd[b + "mlp.2.weight"], sd[b + "mlp.2.bias"] = rnd(d, 4 * d), rnd(d, scale=0.1)
    # Upstream's file holds the decoder too; the loader must ignore it.
    sd["decoder.token_embedding.weight"] = rnd(100, d)
    sd["decoder.positional_embedding"] = rnd(8, d)
    (folder / "whisper").mkdir(exist_ok=True)
    path = folder / "whisper" / "tiny.pt"
    torch.save({"dims": dims, "model_state_dict": sd}, path)
    return path


def write_vae(folder: Path, seed: int = 2) -> Path:
    """Write a tiny diffusers ``AutoencoderKL`` folder with the SD VAE's ×8 downscale and 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        block_out_channels=(8, 8, 16, 16), sample_size=RESOLUTION,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    path = folder / "sd-vae-ft-mse"
    vae.save_pretrained(path)
    return path


def write_syncnet(folder: Path, seed: int = 3) -> Path:
    """Write ``stable_syncnet.pt`` ({"state_dict"}) and its config ``syncnet.yaml``; return the config path."""
    from latentsync.models.syncnet import StableSyncNet

    net = StableSyncNet.from_config(SYNCNET_MODEL)
    torch.save({"state_dict": _randomize(net, seed)}, folder / "stable_syncnet.pt")
    cfg_path = folder / "syncnet.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": SYNCNET_MODEL}, sort_keys=False))
    return cfg_path


def write_mask(folder: Path) -> Path:
    """A 256×256 mask in upstream's convention (white = keep): the lower face from below the eyes to the chin."""
    import cv2

    mask = np.full((256, 256, 3), 255, np.uint8)
    mask[128:243, 9:248] = 0  # jaw and mouth
    mask[95:128, 9:78] = 0  # cheeks either side of the nose
    mask[95:128, 178:247] = 0
    path = folder / "mask.png"
    cv2.imwrite(str(path), mask)
    return path


def make_tiny_weights(folder: str | Path, *, syncnet: bool = True) -> tuple[Path, Path]:
    """Fill ``folder`` with tiny random weights, their configs and their manifest; return ``(weights_dir,
    unet_config_path)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = write_unet(folder)
    write_whisper(folder)
    write_vae(folder)
    write_mask(folder)
    if syncnet:
        write_syncnet(folder)
    manifest_for(folder, folder / "weights.txt")
    return folder, cfg


# Where each tiny file sits in weights.txt's terms (destination → version tag).
DESTS = {"latentsync_unet.pt": "1.6", "whisper/tiny.pt": "1.6", "stable_syncnet.pt": "1.6",
         "sd-vae-ft-mse/config.json": "all", "sd-vae-ft-mse/diffusion_pytorch_model.safetensors": "all",
         "mask.png": "all"}


def manifest_for(weights: Path, path: Path, base_url: str = "http://127.0.0.1:9") -> Path:
    """A manifest in weights.txt's format describing the tiny files exactly (size and sha256)."""
    lines = []
    for dest, version in DESTS.items():
        if not (weights / dest).is_file():  # SyncNet is optional to the pipeline; the tiny set leaves it out
            continue
        data = (weights / dest).read_bytes()
        lines.append(f"{version} {base_url}/{dest} {dest} {len(data)} {hashlib.sha256(data).hexdigest()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_weights_with_manifest(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Tiny weights, their U-Net config and a manifest describing them (so nothing is downloaded), for a test module."""
    folder, cfg = make_tiny_weights(tmp_path_factory.mktemp("weights"))
    return folder, cfg, manifest_for(folder, tmp_path_factory.mktemp("manifest") / "weights.txt")


if __name__ == "__main__":  # python tests/tiny_weights.py FOLDER: tiny weights to try the CLI and the API on
    import sys

    print(make_tiny_weights(sys.argv[1] if len(sys.argv) > 1 else "tiny-weights")[0])
