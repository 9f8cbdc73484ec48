"""The LatentSync 3D U-Net: SD-1.5 layout, 13 input channels, Whisper audio cross-attention, motion modules.

State-dict keys and maths follow upstream ``bytedance/LatentSync`` (``latentsync/models/unet.py`` and friends);
built from the ``model:`` section of an upstream config (``configs/unet/stage2*.yaml``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from latentsync.errors import InputError
from latentsync.models.motion_module import MotionModuleConfig
from latentsync.models.resnet import FrameConv2d, activation, group_norm
from latentsync.models.unet_blocks import BlockOptions, DownBlock3D, UNetMidBlock3DCrossAttn, UpBlock3D

_DOWN_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
_UP_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")
# keys of upstream configs that do not change the network built here
_IGNORED_KEYS = {"sample_size", "upcast_attention", "_class_name", "_diffusers_version"}
# upstream options whose only supported value is their default (what every released config uses)
_FIXED_KEYS = {
    "use_linear_projection": False, "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "motion_module_type": "Vanilla",
}


@dataclass(frozen=True)
class UNetConfig:
    """The ``model:`` section of an upstream U-Net config, typed; defaults are upstream's constructor defaults."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    mid_block_type: str = "UNetMidBlock3DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # legacy SD meaning: the NUMBER of heads per block
    cross_attention_dim: int = 1280
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    center_input_sample: bool = False
    resnet_time_scale_shift: str = "default"
    use_inflated_groupnorm: bool = False
    add_audio_layer: bool = False
    use_motion_module: bool = False
    motion_module_resolutions: tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_kwargs: MotionModuleConfig = MotionModuleConfig()

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        """Read an upstream ``model:`` dict; unknown keys and unsupported option values are an InputError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - names - _IGNORED_KEYS - set(_FIXED_KEYS))
        if unknown:
            raise InputError(f"unknown U-Net config keys: {', '.join(unknown)}")
        for key, fixed in _FIXED_KEYS.items():
            if key in cfg and cfg[key] != fixed:
                raise InputError(f"U-Net config {key}={cfg[key]!r} is not supported (only {fixed!r})")
        values: dict[str, Any] = {}
        for key in names & set(cfg):
            value = cfg[key]
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        if "norm_eps" in values:  # PyYAML's safe_load reads 1e-5 as a string
            values["norm_eps"] = float(values["norm_eps"])
        mm = dict(cfg.get("motion_module_kwargs") or {})
        mm_names = {f.name for f in fields(MotionModuleConfig)}
        if set(mm) - mm_names - {"cross_frame_attention_mode"}:
            raise InputError(f"unknown motion_module_kwargs: {', '.join(sorted(set(mm) - mm_names))}")
        if mm.get("cross_frame_attention_mode") is not None:
            raise InputError("motion_module_kwargs.cross_frame_attention_mode is not supported")
        mm = {k: tuple(v) if isinstance(v, list) else v for k, v in mm.items() if k in mm_names}
        values["motion_module_kwargs"] = MotionModuleConfig(**mm)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise InputError for layouts this port does not build."""
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise InputError("U-Net config: down/up block types must match block_out_channels in length")
        if bad := [t for t in self.down_block_types if t not in _DOWN_TYPES] + [
            t for t in self.up_block_types if t not in _UP_TYPES
        ]:
            raise InputError(f"U-Net config: unsupported block types {bad}")
        if self.mid_block_type != "UNetMidBlock3DCrossAttn":
            raise InputError(f"U-Net config: unsupported mid_block_type {self.mid_block_type!r}")
        if self.resnet_time_scale_shift != "default":
            raise InputError("U-Net config: only resnet_time_scale_shift 'default' is supported")
        if isinstance(self.attention_head_dim, tuple) and len(self.attention_head_dim) != n:
            raise InputError("U-Net config: attention_head_dim needs one entry per block")

    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (upstream's ``attention_head_dim``)."""
        h = self.attention_head_dim
        return tuple(h) if isinstance(h, tuple) else (h,) * len(self.block_out_channels)


def _zeroed(conv: FrameConv2d) -> FrameConv2d:
    """``conv`` with its weight and bias set to zero."""
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


@dataclass
class UNet3DConditionOutput:
    sample: torch.Tensor


@dataclass
class DeepCache:
    """What a full U-Net pass leaves for DeepCache's shallow passes (upstream ``cache_branch_id=0``).

    ``deep`` is the input of the last up block's last layer: everything below the shallowest skip connection.
    One per chunk: the first step of a chunk is always a full pass.
    """

    deep: torch.Tensor | None = None


class UNet3DConditionModel(nn.Module):
    """``sample (B, in_channels, F, h, w)``, ``timestep``, audio ``(B·F, tokens, cross_attention_dim)`` → noise."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        channels = c.block_out_channels
        heads = c.heads()
        temb_channels = channels[0] * 4
        opts = BlockOptions(
            temb_channels=temb_channels, groups=c.norm_num_groups, eps=c.norm_eps, act_fn=c.act_fn,
            cross_attention_dim=c.cross_attention_dim, add_audio_layer=c.add_audio_layer,
            per_frame_norm=c.use_inflated_groupnorm, motion=c.motion_module_kwargs,
        )
        # upstream zero-initialises conv_in and conv_out (only matters for a model that is trained from here)
        self.conv_in = _zeroed(FrameConv2d(c.in_channels, channels[0], kernel_size=3, padding=1))
        self.time_proj = Timesteps(channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)

        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: upstream's state-dict order
        n = len(channels)
        for i, kind in enumerate(c.down_block_types):
            self.down_blocks.append(
                DownBlock3D(
                    opts, channels[max(i - 1, 0)], channels[i], layers=c.layers_per_block,
                    cross_attention=kind == "CrossAttnDownBlock3D", heads=heads[i],
                    motion=c.use_motion_module and 2**i in c.motion_module_resolutions
                    and not c.motion_module_decoder_only,
                    downsample=i < n - 1, downsample_padding=c.downsample_padding,
                )
            )
        self.mid_block = UNetMidBlock3DCrossAttn(
            opts, channels[-1], heads=heads[-1], motion=c.use_motion_module and c.motion_module_mid_block,
            output_scale_factor=c.mid_block_scale_factor,
        )
        rev, rev_heads = channels[::-1], heads[::-1]
        for i, kind in enumerate(c.up_block_types):
            self.up_blocks.append(
                UpBlock3D(
                    opts, rev[min(i + 1, n - 1)], rev[i], rev[max(i - 1, 0)], layers=c.layers_per_block + 1,
                    cross_attention=kind == "CrossAttnUpBlock3D", heads=rev_heads[i],
                    # upstream writes the up-path resolution as 2 ** (3 - i): right for its four blocks
                    motion=c.use_motion_module and 2 ** (3 - i) in c.motion_module_resolutions,
                    upsample=i < n - 1,
                )
            )
        self.num_upsamplers = n - 1
        self.conv_norm_out = group_norm(c.norm_num_groups, channels[0], c.norm_eps, c.use_inflated_groupnorm)
        self.conv_act = activation("silu")
        self.conv_out = _zeroed(FrameConv2d(channels[0], c.out_channels, kernel_size=3, padding=1))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | UNetConfig) -> UNet3DConditionModel:
        """Build from the ``model:`` section of an upstream config (weights randomly initialised)."""
        return cls(cfg if isinstance(cfg, UNetConfig) else UNetConfig.from_dict(cfg))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def _time_embedding(self, timestep: torch.Tensor | float | int, sample: torch.Tensor) -> torch.Tensor:
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.float64 if isinstance(t, float) else torch.int64, device=sample.device)
        elif t.dim() == 0:
            t = t[None].to(sample.device)
        t = t.expand(sample.shape[0])
        # the sinusoidal table is float32 whatever the model dtype; the MLP runs in the model dtype
        return self.time_embedding(self.time_proj(t).to(self.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        cache: DeepCache | None = None,
        shallow: bool = False,
    ) -> UNet3DConditionOutput:
        """Predict the noise. With ``cache``, a full pass stores its deep features there and ``shallow=True``
        reuses them, computing only ``conv_in``, the last up block's last layer and the output head (DeepCache)."""
        audio = encoder_hidden_states
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._time_embedding(timestep, sample)
        sample = self.conv_in(sample)

        if shallow:
            if cache is None or cache.deep is None:
                raise ValueError("a shallow DeepCache pass needs a cache filled by a full pass")
            last = cast(UpBlock3D, self.up_blocks[-1])
            # the shallowest skip of the network is conv_in's output, consumed by the last layer of the last block
            sample = last.upsample(last.layer(len(last.resnets) - 1, cache.deep, sample, emb, audio))
            return UNet3DConditionOutput(self.conv_out(self.conv_act(self.conv_norm_out(sample))))

        # latent sizes that are not a multiple of 2**num_upsamplers need explicit upsampling sizes
        forward_upsample_size = any(s % 2**self.num_upsamplers for s in sample.shape[-2:])
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in self.down_blocks:
            sample, res = block(sample, emb, audio)
            skips += res
        sample = self.mid_block(sample, emb, audio)
        for i, module in enumerate(self.up_blocks):
            block = cast(UpBlock3D, module)
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            if cache is not None and i == len(self.up_blocks) - 1:
                for j in range(n - 1):
                    sample = block.layer(j, sample, res[-1 - j], emb, audio)
                cache.deep = sample
                sample = block.upsample(block.layer(n - 1, sample, res[0], emb, audio), size)
            else:
                sample = block(sample, res, emb, audio, size)
        return UNet3DConditionOutput(self.conv_out(self.conv_act(self.conv_norm_out(sample))))
