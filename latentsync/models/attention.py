"""Spatial transformer of the LatentSync U-Net: per-frame self-attention and per-frame audio cross-attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from latentsync.models.resnet import batch_to_frames, frames_to_batch


class MultiHeadAttention(nn.Module):
    """Multi-head attention (PyTorch SDPA) with upstream's parameter names ``to_q/to_k/to_v/to_out.0``; each
    subclass's ``forward`` says what attends to what."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def attend(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, no mask
        b, _, n, _ = out.shape
        return self.to_out[1](self.to_out[0](out.transpose(1, 2).reshape(b, n, -1)))


class Attention(MultiHeadAttention):
    """Self-attention, or cross-attention to ``context``."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(x, x if context is None else context)


class BasicTransformerBlock(nn.Module):
    """Self-attention, audio cross-attention (``attn2``, when ``add_audio_layer``), GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, add_audio_layer: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        if add_audio_layer:
            self.norm2: nn.LayerNorm | None = nn.LayerNorm(dim)
            self.attn2: Attention | None = Attention(dim, heads, head_dim, context_dim=cross_attention_dim)
        else:
            self.norm2 = self.attn2 = None
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None and self.norm2 is not None and audio is not None:
            # batch row (b·f) of the image tokens meets batch row (b·f) of the audio: each frame hears its own window
            x = self.attn2(self.norm2(x), audio) + x
        return self.ff(self.norm3(x)) + x


class Transformer3DModel(nn.Module):
    """GroupNorm → 1×1 conv → transformer blocks over each frame's h·w tokens → 1×1 conv, residual."""

    def __init__(
        self,
        channels: int,
        heads: int,
        *,
        groups: int,
        cross_attention_dim: int,
        add_audio_layer: bool,
        num_layers: int = 1,
    ):
        super().__init__()
        head_dim = channels // heads  # upstream's attention_head_dim is the number of heads (legacy SD naming)
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim, add_audio_layer)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.shape[2]
        x = frames_to_batch(x)
        bf, _, h, w = x.shape
        residual = x
        x = self.proj_in(self.norm(x))
        inner = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(bf, h * w, inner)
        if audio is not None and audio.dim() == 4:  # (b, f, tokens, d)
            audio = audio.flatten(0, 1)
        for block in self.transformer_blocks:
            x = block(x, audio)
        x = self.proj_out(x.reshape(bf, h, w, inner).permute(0, 3, 1, 2).contiguous())
        return batch_to_frames(x + residual, frames)
