"""AnimateDiff-style temporal layers ("motion modules"): self-attention across the frames of each pixel."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from latentsync.models.attention import MultiHeadAttention
from latentsync.models.resnet import batch_to_frames, frames_to_batch

# Upstream builds TemporalTransformer3DModel without passing the U-Net's norm_num_groups, so its
# GroupNorm always has its constructor default of 32 groups.
MOTION_NORM_GROUPS = 32


@dataclass(frozen=True)
class MotionModuleConfig:
    """The ``motion_module_kwargs`` of an upstream U-Net config (defaults: upstream's constructor)."""

    num_attention_heads: int = 8
    num_transformer_block: int = 2
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    temporal_position_encoding: bool = False
    temporal_position_encoding_max_len: int = 24
    temporal_attention_dim_div: int = 1
    zero_initialize: bool = True


class PositionalEncoding(nn.Module):
    """Sinusoidal frame-position table ``pe (1, max_len, dim)``; a persistent buffer as in the checkpoints."""

    pe: torch.Tensor

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"{x.shape[1]} frames exceed the temporal position table ({self.pe.shape[1]})")
        return x + self.pe[:, : x.shape[1]]


class TemporalAttention(MultiHeadAttention):
    """Self-attention over the frames of each spatial position (upstream's ``VersatileAttention``, Temporal_Self)."""

    def __init__(self, dim: int, heads: int, head_dim: int, position_encoding: bool, max_len: int):
        super().__init__(dim, heads, head_dim)
        self.pos_encoder = PositionalEncoding(dim, max_len) if position_encoding else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, s, c = x.shape
        x = x.reshape(bf // frames, frames, s, c).transpose(1, 2).reshape(-1, frames, c)  # (b·s, f, c)
        if self.pos_encoder is not None:  # only the attention input carries the position, not the residual
            x = self.pos_encoder(x)
        x = self.attend(x, x)
        return x.reshape(bf // frames, s, frames, c).transpose(1, 2).reshape(bf, s, c)


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal self-attention blocks, then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, mm: MotionModuleConfig):
        super().__init__()
        for kind in mm.attention_block_types:
            if kind != "Temporal_Self":
                raise ValueError(f"unsupported motion-module attention block {kind!r} (only Temporal_Self)")
        n = len(mm.attention_block_types)
        pe, max_len = mm.temporal_position_encoding, mm.temporal_position_encoding_max_len
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, head_dim, pe, max_len) for _ in range(n)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n)])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms, strict=True):
            x = attention(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nn.Module):
    """GroupNorm per frame → Linear → temporal blocks → Linear, residual."""

    def __init__(self, channels: int, mm: MotionModuleConfig):
        super().__init__()
        heads = mm.num_attention_heads
        head_dim = channels // heads // mm.temporal_attention_dim_div
        inner = heads * head_dim
        self.norm = nn.GroupNorm(MOTION_NORM_GROUPS, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(inner, heads, head_dim, mm) for _ in range(mm.num_transformer_block)]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        x = frames_to_batch(x)
        bf, c, h, w = x.shape
        residual = x
        # contiguous: upstream's weights require grad, which sends this permuted input through the same GEMM
        # as a contiguous one; a frozen weight would take a different (differently rounded) path
        x = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c).contiguous())
        for block in self.transformer_blocks:
            x = block(x, frames)
        x = self.proj_out(x).reshape(bf, h, w, c).permute(0, 3, 1, 2).contiguous()
        return batch_to_frames(x + residual, frames)


class VanillaTemporalModule(nn.Module):
    """One motion module (``motion_modules.N``); its output projection starts at zero, i.e. as the identity."""

    def __init__(self, channels: int, mm: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer3DModel(channels, mm)
        if mm.zero_initialize:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal_transformer(x)
