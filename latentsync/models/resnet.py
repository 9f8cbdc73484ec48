"""Per-frame convolutions and the 3D ResNet block of the LatentSync U-Net (tensors are ``(b, c, f, h, w)``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """``(b, c, f, h, w)`` → ``(b·f, c, h, w)``: every frame becomes an image of the batch."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of :func:`frames_to_batch`."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


class FrameConv2d(nn.Conv2d):
    """A 2-D convolution applied to each frame of a video tensor (upstream's ``InflatedConv3d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(super().forward(frames_to_batch(x)), x.shape[2])


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame (upstream's ``InflatedGroupNorm``, only when ``use_inflated_groupnorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(super().forward(frames_to_batch(x)), x.shape[2])


def group_norm(groups: int, channels: int, eps: float, per_frame: bool) -> nn.GroupNorm:
    # nn.GroupNorm on a 5-D tensor pools its statistics over all frames of the clip: that is what the
    # released checkpoints were trained with (use_inflated_groupnorm=False).
    return (FrameGroupNorm if per_frame else nn.GroupNorm)(groups, channels, eps=eps, affine=True)


def activation(name: str) -> nn.Module:
    """The U-Net's ``act_fn`` (``silu``/``swish`` are the same function)."""
    if name in ("silu", "swish"):
        return nn.SiLU()
    if name == "mish":
        return nn.Mish()
    raise ValueError(f"unsupported act_fn {name!r}")


class ResnetBlock3D(nn.Module):
    """GroupNorm → act → conv → + time embedding → GroupNorm → act → conv, plus a (projected) shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        groups: int,
        eps: float,
        act_fn: str = "silu",
        output_scale_factor: float = 1.0,
        per_frame_norm: bool = False,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(groups, in_channels, eps, per_frame_norm)
        self.conv1 = FrameConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(groups, out_channels, eps, per_frame_norm)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = FrameConv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = (
            FrameConv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None, None]
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample3D(nn.Module):
    """Per-frame 3×3 convolution with stride 2."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample3D(nn.Module):
    """Nearest-neighbour ×2 in height and width (never in time), then a per-frame 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, ...] | None = None) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on every backend
            x = x.float()
        if output_size is None:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        else:  # odd latent sizes: match the skip connection exactly
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x.to(dtype))
