"""StableSyncNet: LatentSync's lip-sync expert (two convolutional encoders, cosine of unit embeddings = sync).

Port of upstream ``latentsync/models/stable_syncnet.py`` with the same state-dict keys
(``configs/syncnet/syncnet_16_pixel_attn.yaml`` ⇒ ``stable_syncnet.pt``). Not used to generate video;
we use it to score lip sync and to pick the speaking face.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

VIDEO_FPS = 25.0  # the frame rate StableSyncNet was trained at
WINDOW_FRAMES = 16  # consecutive frames one visual window stacks (the shipped config's in_channels / 3)

Factor = int | tuple[int, int]


@dataclass(frozen=True)
class EncoderConfig:
    """One ``DownEncoder2D``: per-block widths, stride (int or (h, w)) and whether an attention block follows."""

    in_channels: int
    block_out_channels: tuple[int, ...]
    downsample_factors: tuple[Factor, ...]
    attn_blocks: tuple[int, ...]
    dropout: float = 0.0
    norm_num_groups: int = 32  # upstream hard-codes 32; not part of its YAML

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderConfig:
        n = len(d["block_out_channels"])
        if len(d["downsample_factors"]) != n or len(d["attn_blocks"]) != n:
            raise ValueError(f"encoder config lists differ in length: {dict(d)}")
        return cls(
            in_channels=int(d["in_channels"]),
            block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
            downsample_factors=tuple(_factor(f) for f in d["downsample_factors"]),
            attn_blocks=tuple(int(a) for a in d["attn_blocks"]),
            dropout=float(d.get("dropout", 0.0)),
            norm_num_groups=int(d.get("norm_num_groups", 32)),
        )


@dataclass(frozen=True)
class SyncNetConfig:
    """The ``model:`` section of an upstream SyncNet YAML."""

    audio_encoder: EncoderConfig
    visual_encoder: EncoderConfig

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SyncNetConfig:
        return cls(EncoderConfig.from_dict(d["audio_encoder"]), EncoderConfig.from_dict(d["visual_encoder"]))


def _factor(value: Any) -> Factor:
    """A stride from the YAML: an int, or an (h, w) pair."""
    if not isinstance(value, Sequence):
        return int(value)
    if len(value) != 2:
        raise ValueError(f"a downsample factor is an int or an (h, w) pair, got {value!r}")
    return int(value[0]), int(value[1])


def _downsample_pad(factor: Factor) -> tuple[int, int, int, int]:
    """``F.pad`` widths (left, right, top, bottom) before upstream's unpadded stride-``factor`` 3×3 conv.

    A strided axis gets one zero column/row after it (so even sizes halve); an axis of stride 1 in a
    (h, w) factor gets one on each side (its size is kept).
    """
    if isinstance(factor, tuple) and factor[0] == 1:
        return (0, 1, 1, 1)
    if isinstance(factor, tuple) and factor[1] == 1:
        return (1, 1, 0, 1)
    return (0, 1, 0, 1)


class DownsampleResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D (no time embedding) followed by upstream's padded strided conv."""

    def __init__(self, in_channels: int, out_channels: int, factor: Factor, *, groups: int, dropout: float):
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            temb_channels=None,  # type: ignore[arg-type]  # diffusers types it int; None means no time embedding
            groups=groups,
            eps=1e-6,
            dropout=dropout,
            non_linearity="silu",
        )
        # upstream skips the conv only for the plain int 1; a (1, 1) pair still gets one
        self.downsample_conv = None if factor == 1 else nn.Conv2d(out_channels, out_channels, 3, stride=factor)
        self.pad = _downsample_pad(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = super().forward(x, None)  # type: ignore[arg-type]  # typed Tensor; a block without one takes None
        if self.downsample_conv is not None:
            x = self.downsample_conv(F.pad(x, self.pad))
        return x


class AttentionBlock2D(nn.Module):
    """GroupNorm + 1×1 conv in, pre-LN self-attention and GEGLU feed-forward over the h·w tokens, 1×1 conv out."""

    def __init__(self, dim: int, *, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout, activation_fn="geglu")
        self.conv_in = nn.Conv2d(dim, dim, 1)
        self.conv_out = nn.Conv2d(dim, dim, 1)
        self.attn = Attention(query_dim=dim, heads=8, dim_head=dim // 8, dropout=dropout, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.conv_in(self.norm1(x)).flatten(2).transpose(1, 2)  # (b, h·w, c)
        t = self.attn(self.norm2(t)) + t
        t = self.ff(self.norm3(t)) + t
        t = t.transpose(1, 2).reshape(b, c, h, w)
        return self.conv_out(t) + x


class DownEncoder2D(nn.Module):
    """conv_in → one resnet(+downsample) per width, each optionally followed by attention → GroupNorm + ReLU."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        widths = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        # resnets and attention blocks share one list, so upstream's indices (down_blocks.4 = an attention) hold
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for c_out, factor, attn in zip(widths, cfg.downsample_factors, cfg.attn_blocks, strict=True):
            blocks.append(
                DownsampleResnetBlock2D(c_in, c_out, factor, groups=cfg.norm_num_groups, dropout=cfg.dropout)
            )
            if attn:
                blocks.append(AttentionBlock2D(c_out, groups=cfg.norm_num_groups, dropout=cfg.dropout))
            c_in = c_out
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, widths[-1], eps=1e-6)
        self.act_fn_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.act_fn_out(self.norm_out(x))


class StableSyncNet(nn.Module):
    """Visual (16 stacked RGB lower-half frames) and audio (Wav2Lip mel window) encoders → unit embeddings."""

    def __init__(self, config: SyncNetConfig):
        super().__init__()
        self.config = config
        self.audio_encoder = DownEncoder2D(config.audio_encoder)
        self.visual_encoder = DownEncoder2D(config.visual_encoder)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | SyncNetConfig) -> StableSyncNet:
        """Build from the ``model:`` section of an upstream SyncNet YAML (random init; load weights after)."""
        if not isinstance(config, SyncNetConfig):
            config = SyncNetConfig.from_dict(config)
        return cls(config)

    def encode_visual(self, image_sequences: torch.Tensor) -> torch.Tensor:
        """(b, 3·frames, h, w) in [−1, 1] → (b, C) unit vectors."""
        return F.normalize(self.visual_encoder(image_sequences).flatten(1), p=2, dim=1)

    def encode_audio(self, audio_sequences: torch.Tensor) -> torch.Tensor:
        """(b, 1, mels, mel frames) → (b, C) unit vectors."""
        return F.normalize(self.audio_encoder(audio_sequences).flatten(1), p=2, dim=1)

    def forward(
        self, image_sequences: torch.Tensor, audio_sequences: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(vision_embeds, audio_embeds), each (b, C) and L2-normalised; their dot product is the sync cosine."""
        return self.encode_visual(image_sequences), self.encode_audio(audio_sequences)
