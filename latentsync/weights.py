"""Loading checkpoints in the upstream formats (SyncNet, U-Net, VAE, Whisper), strictly: a missing, unexpected or
mis-shaped key is an error."""
from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from latentsync.config import config_path, load_config
from latentsync.errors import InputError, one_line

log = logging.getLogger(__name__)

# What torch.load / safetensors raise for a truncated, foreign or corrupt file (a zip without its directory, a text
# file, an empty file, a pickle holding code). Anything else is our bug and keeps its traceback.
_UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError)


# torch.save writes a zip archive (since 1.6) or, in the legacy format, a pickle of protocol 2 or higher.
_TORCH_MAGICS = (b"PK\x03\x04", b"\x80")


def _torch_load(path: Path, what: str = "checkpoint") -> object:
    """``torch.load`` of a checkpoint (tensors only, memory-mapped when it can be); a file that is not one — a text
    file, a web page, a truncated or foreign archive — is an ``InputError`` naming it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {one_line(e)}") from e
    if not head.startswith(_TORCH_MAGICS):  # text fed to the unpickler fails in arbitrary ways (IndexError)
        raise InputError(f"{what} {path} is not a PyTorch checkpoint (it starts with {head!r}); replace the file")
    try:
        try:  # memory-mapped: the tensors are read as they are used, not copied up front
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # files written with torch.save(..., _use_new_zipfile_serialization=False) cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except (*_UNREADABLE, IndexError) as e:  # a truncated or foreign file: say which one, in one line
        # torch's refusal of a pickle holding code is a paragraph; its last sentence names what it met
        reason = one_line(e).split("WeightsUnpickler error: ")[-1].split(" Check the documentation")[0]
        raise InputError(f"cannot read {what} {path}: {reason}") from e


def read_state_dict(path: str | Path, *, key: str | None = "state_dict") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, bare ``.pt`` state dict or upstream ``{"state_dict": ...}`` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (*_UNREADABLE, SafetensorError) as e:  # a truncated or foreign file: say which one
            raise InputError(f"cannot read checkpoint {path}: {one_line(e)}") from e
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and key is not None and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path} is not a state dict (expected tensors, optionally under {key!r})")
    return dict(obj)


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', …' if len(keys) > limit else ''})"


def check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise naming the first few and the count of missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {_names(shapes)}")
    if problems:
        raise InputError(f"{what} does not match the model: " + "; ".join(problems))


def load_strict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, *, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Check the keys, then assign the tensors (works on a meta-device model: no random init is paid)."""
    check_keys(model, state_dict, what)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def load_syncnet(
    config: str | Path | Mapping, checkpoint_path: str | Path, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> StableSyncNet:
    """StableSyncNet from a SyncNet YAML path (or its ``model:`` dict) and a checkpoint, strictly, in eval mode."""
    from latentsync.models.syncnet import StableSyncNet

    settings: Mapping[str, Any] = (
        config if isinstance(config, Mapping) else load_config(config, "SyncNet config", section="model"))
    if "model" in settings:  # a whole upstream YAML rather than its model: section
        settings = settings["model"]
    with torch.device("meta"):  # no random init of ~400 M parameters that the checkpoint overwrites
        model = StableSyncNet.from_config(settings)
    state_dict = read_state_dict(checkpoint_path)
    load_strict(model, state_dict, f"SyncNet checkpoint {checkpoint_path}", dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------- U-Net, VAE
# The shipped config of each release; the two differ only in data.resolution (same network).
UNET_CONFIGS = {"1.5": "unet/stage2.yaml", "1.6": "unet/stage2_512.yaml"}

# LatentSync 1.0 checkpoints name the audio cross-attention of every spatial transformer block differently from
# 1.5 and 1.6: ``…transformer_blocks.N.audio_cross_attn.{norm,attn}.*`` is
# ``…transformer_blocks.N.{norm2,attn2}.*``.
UNET_V10_KEY_MAP = {
    ".audio_cross_attn.norm.": ".norm2.",
    ".audio_cross_attn.attn.": ".attn2.",
}

VAE_SCALING_FACTOR = 0.18215  # sd-vae-ft-mse, as upstream sets it
VAE_SHIFT_FACTOR = 0.0

if TYPE_CHECKING:  # each loader imports what it builds: importing this module needs neither diffusers nor transformers
    # From its own module: to a type checker, diffusers' top-level names are its placeholders for a missing torch.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from transformers import WhisperConfig

    from latentsync.models.syncnet import StableSyncNet
    from latentsync.models.unet import UNet3DConditionModel
    from latentsync.models.whisper import AudioEncoder


def unet_config_for(version: str) -> Path:
    """The U-Net config matching a LatentSync checkpoint release: ``"1.5"`` (256 px) or ``"1.6"`` (512 px)."""
    if version not in UNET_CONFIGS:
        raise InputError(f"unknown LatentSync version {version!r}: choose one of {', '.join(UNET_CONFIGS)}")
    return config_path(UNET_CONFIGS[version])


def remap_unet_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LatentSync 1.0 U-Net keys to the 1.5/1.6 names; other keys pass through unchanged."""
    out = {}
    for key, value in state_dict.items():
        for old, new in UNET_V10_KEY_MAP.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def load_unet(
    config: str | Path | Mapping, checkpoint_path: str | Path, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet3DConditionModel:
    """The LatentSync U-Net from an upstream config (path or ``model:`` dict) and a checkpoint, strictly, in eval mode.

    Reads upstream ``latentsync_unet.pt`` ({"state_dict", "global_step"}), bare state dicts and .safetensors;
    1.0 key names are mapped. The model is built on the meta device and takes the checkpoint's tensors as they are.
    """
    from latentsync.models.unet import UNet3DConditionModel

    source, resolution = None, None
    if isinstance(config, Mapping):
        settings: Mapping[str, Any] = config
    else:
        source = str(config)
        if not Path(config).is_file():
            raise InputError(f"U-Net config not found: {config}")
        settings = load_config(config, "U-Net config", section="model")
    if "model" in settings:  # a whole upstream YAML rather than its model: section
        resolution = (settings.get("data") or {}).get("resolution")
        settings = settings["model"]
    with torch.device("meta"):  # no random init of 1.27 B parameters that the checkpoint overwrites
        model = UNet3DConditionModel.from_config(settings)
    state_dict = read_state_dict(checkpoint_path)
    renamed = sum(any(old in k for old in UNET_V10_KEY_MAP) for k in state_dict)
    if renamed:
        log.info("U-Net checkpoint %s: %d LatentSync 1.0 key names mapped to 1.5 names", checkpoint_path, renamed)
        state_dict = remap_unet_keys(state_dict)
    load_strict(model, state_dict, f"U-Net checkpoint {checkpoint_path}", dtype=dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a buffer outside the state dict would still be on the meta device
        raise RuntimeError(f"U-Net tensors left uninitialised after loading: {left[:5]}")
    # A 1.6 checkpoint run with the 256-px config is upstream's most frequent mistake: say which pairing is used
    # (a caller passing the model: dict, as the loader does, states the resolution itself).
    if source is not None:
        log.info("U-Net %s with config %s: resolution %s (1.5 checkpoints need 256 px, 1.6 need 512 px)",
                 checkpoint_path, source, f"{resolution} px" if resolution else "not given")
    return model.to(device).eval().requires_grad_(False)


def load_vae(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """diffusers ``AutoencoderKL`` from a local folder (like stabilityai/sd-vae-ft-mse), scaling 0.18215, eval mode."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(
            f"VAE folder {folder} is missing or has no config.json (expected a diffusers AutoencoderKL folder, "
            "e.g. a download of stabilityai/sd-vae-ft-mse)"
        )
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (*_UNREADABLE, SafetensorError) as e:  # missing weights file (OSError), foreign config, bad tensors
        raise InputError(f"cannot load the VAE from {folder}: {e}") from e
    vae.register_to_config(scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR)
    return vae.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ Whisper
# OpenAI Whisper names → transformers WhisperEncoder names (without OpenAI's "encoder." prefix).
_OPENAI_ENCODER_KEYS = {
    "conv1.weight": "conv1.weight",
    "conv1.bias": "conv1.bias",
    "conv2.weight": "conv2.weight",
    "conv2.bias": "conv2.bias",
    "positional_embedding": "embed_positions.weight",  # a buffer in OpenAI's model, an Embedding in transformers'
    "ln_post.weight": "layer_norm.weight",
    "ln_post.bias": "layer_norm.bias",
}
_OPENAI_BLOCK_MODULES = {
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",  # bias-free in both
    "attn.value": "self_attn.v_proj",
    "attn.out": "self_attn.out_proj",
    "attn_ln": "self_attn_layer_norm",
    "mlp.0": "fc1",
    "mlp.2": "fc2",
    "mlp_ln": "final_layer_norm",
}
_OPENAI_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def openai_to_transformers_key(name: str) -> str:
    """transformers name of an OpenAI encoder tensor (given without ``encoder.``); unknown names pass unchanged."""
    if name in _OPENAI_ENCODER_KEYS:
        return _OPENAI_ENCODER_KEYS[name]
    m = _OPENAI_BLOCK_KEY.fullmatch(name)
    if m and m[2] in _OPENAI_BLOCK_MODULES:
        return f"layers.{m[1]}.{_OPENAI_BLOCK_MODULES[m[2]]}.{m[3]}"
    return name  # left for the strict key check to report


def _config_from_dims(dims: Mapping[str, int]) -> WhisperConfig:
    """The encoder half of a WhisperConfig from OpenAI's ModelDimensions."""
    from transformers import WhisperConfig

    return WhisperConfig(
        num_mel_bins=dims["n_mels"],
        max_source_positions=dims["n_audio_ctx"],
        d_model=dims["n_audio_state"],
        encoder_layers=dims["n_audio_layer"],
        encoder_attention_heads=dims["n_audio_head"],
        encoder_ffn_dim=4 * dims["n_audio_state"],  # OpenAI's MLP is always 4× wide
        activation_function="gelu",  # exact GELU, as torch.nn.GELU()
        # the decoder half, so that the config also describes the whole model (it is never built here)
        vocab_size=dims["n_vocab"],
        max_target_positions=dims["n_text_ctx"],
        decoder_layers=dims["n_text_layer"],
        decoder_attention_heads=dims["n_text_head"],
        decoder_ffn_dim=4 * dims["n_text_state"],
    )


def _read_openai_checkpoint(path: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    obj = _torch_load(path, "Whisper checkpoint")
    if not isinstance(obj, Mapping) or "dims" not in obj or "model_state_dict" not in obj:
        raise InputError(f"{path} is not an OpenAI Whisper checkpoint (expected 'dims' and 'model_state_dict')")
    try:
        config = _config_from_dims(obj["dims"])
    except (KeyError, TypeError) as e:
        raise InputError(f"{path}: incomplete Whisper 'dims' ({e})") from e
    prefix = "encoder."  # the decoder's tensors are not needed for features
    state_dict = {openai_to_transformers_key(k[len(prefix):]): v
                  for k, v in obj["model_state_dict"].items() if k.startswith(prefix)}
    return config, state_dict


def _read_transformers_folder(folder: Path) -> tuple[WhisperConfig, dict[str, torch.Tensor]]:
    from transformers import WhisperConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder} has no config.json: not a transformers Whisper folder")
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_file} is not a readable JSON config ({e})") from e
    model_type = settings.get("model_type") if isinstance(settings, dict) else None
    if model_type != "whisper":
        raise InputError(f"{folder} holds a {model_type!r} model, not Whisper")
    config = WhisperConfig.from_json_file(str(config_file))

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = [f for f in (folder / "model.safetensors", folder / "pytorch_model.bin") if f.is_file()][:1]
    if not files:
        raise InputError(f"{folder} has no model.safetensors or pytorch_model.bin")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(read_state_dict(f, key=None))
    # WhisperForConditionalGeneration nests the encoder under "model.encoder.", WhisperModel under "encoder.",
    # a saved WhisperEncoder has no prefix.
    prefix = next((p for p in ("model.encoder.", "encoder.", "") if f"{p}conv1.weight" in tensors), "")
    if not prefix:
        return config, tensors
    return config, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def read_whisper(path: str | Path) -> tuple[WhisperConfig, dict[str, torch.Tensor], str]:
    """Config, encoder tensors (transformers names) and a description of OpenAI's ``whisper/tiny.pt`` format or a
    transformers Whisper folder."""
    path = Path(path)
    if path.is_dir():
        config, state_dict = _read_transformers_folder(path)
        return config, state_dict, f"Whisper folder {path}"
    if path.is_file():
        config, state_dict = _read_openai_checkpoint(path)
        return config, state_dict, f"Whisper checkpoint {path} (OpenAI names mapped to transformers')"
    raise InputError(f"Whisper weights not found: {path}")


def load_whisper(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AudioEncoder:
    """LatentSync's Whisper encoder from OpenAI's checkpoint format (upstream's ``whisper/tiny.pt``) or a
    transformers Whisper folder, strictly."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from latentsync.models.whisper import AudioEncoder

    config, state_dict, what = read_whisper(path)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):  # no random init to pay for: every tensor is assigned below
        encoder = WhisperEncoder(config)
    load_strict(encoder, state_dict, what, dtype=dtype)
    return AudioEncoder(encoder).to(device)
