"""Down, mid and up blocks of the LatentSync U-Net: (ResNet → spatial transformer → motion module) × n."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentsync.models.attention import Transformer3DModel
from latentsync.models.motion_module import MotionModuleConfig, VanillaTemporalModule
from latentsync.models.resnet import Downsample3D, ResnetBlock3D, Upsample3D


@dataclass(frozen=True)
class BlockOptions:
    """What every block of one U-Net shares (taken from the U-Net config once)."""

    temb_channels: int
    groups: int
    eps: float
    act_fn: str
    cross_attention_dim: int
    add_audio_layer: bool
    per_frame_norm: bool
    motion: MotionModuleConfig


def _resnet(opts: BlockOptions, cin: int, cout: int, scale: float = 1.0) -> ResnetBlock3D:
    return ResnetBlock3D(
        cin, cout, opts.temb_channels, groups=opts.groups, eps=opts.eps, act_fn=opts.act_fn,
        output_scale_factor=scale, per_frame_norm=opts.per_frame_norm,
    )


def _transformer(opts: BlockOptions, channels: int, heads: int) -> Transformer3DModel:
    return Transformer3DModel(
        channels, heads, groups=opts.groups, cross_attention_dim=opts.cross_attention_dim,
        add_audio_layer=opts.add_audio_layer,
    )


def _optional(modules: list[nn.Module], used: bool) -> nn.ModuleList | None:
    return nn.ModuleList(modules) if used else None


class DownBlock3D(nn.Module):
    """``CrossAttnDownBlock3D`` (with ``attentions``) or ``DownBlock3D`` (without); returns the skips too."""

    def __init__(
        self, opts: BlockOptions, cin: int, cout: int, *, layers: int, cross_attention: bool, heads: int,
        motion: bool, downsample: bool, downsample_padding: int,
    ):
        super().__init__()
        # registration order = upstream state-dict order: attentions, resnets, motion_modules, downsamplers
        self.attentions = _optional([_transformer(opts, cout, heads) for _ in range(layers)], cross_attention)
        self.resnets = nn.ModuleList([_resnet(opts, cin if i == 0 else cout, cout) for i in range(layers)])
        self.motion_modules = _optional([VanillaTemporalModule(cout, opts.motion) for _ in range(layers)], motion)
        self.downsamplers = _optional([Downsample3D(cout, downsample_padding)], downsample)

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips: tuple[torch.Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, audio)
            if self.motion_modules is not None:
                x = self.motion_modules[i](x)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class UNetMidBlock3DCrossAttn(nn.Module):
    """ResNet, then (spatial transformer → optional motion module → ResNet)."""

    def __init__(self, opts: BlockOptions, channels: int, *, heads: int, motion: bool, output_scale_factor: float):
        super().__init__()
        self.attentions = nn.ModuleList([_transformer(opts, channels, heads)])
        self.resnets = nn.ModuleList([_resnet(opts, channels, channels, output_scale_factor) for _ in range(2)])
        self.motion_modules = _optional([VanillaTemporalModule(channels, opts.motion)], motion)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for i, (attention, resnet) in enumerate(zip(self.attentions, self.resnets[1:], strict=True)):
            x = attention(x, audio)
            if self.motion_modules is not None:
                x = self.motion_modules[i](x)
            x = resnet(x, temb)
        return x


class UpBlock3D(nn.Module):
    """``CrossAttnUpBlock3D`` (with ``attentions``) or ``UpBlock3D``: each layer first concatenates a skip."""

    def __init__(
        self, opts: BlockOptions, cin: int, cout: int, prev_cout: int, *, layers: int, cross_attention: bool,
        heads: int, motion: bool, upsample: bool,
    ):
        super().__init__()
        resnets = []
        for i in range(layers):
            skip_channels = cin if i == layers - 1 else cout
            resnets.append(_resnet(opts, (prev_cout if i == 0 else cout) + skip_channels, cout))
        self.attentions = _optional([_transformer(opts, cout, heads) for _ in range(layers)], cross_attention)
        self.resnets = nn.ModuleList(resnets)
        self.motion_modules = _optional([VanillaTemporalModule(cout, opts.motion) for _ in range(layers)], motion)
        self.upsamplers = _optional([Upsample3D(cout)], upsample)

    def layer(
        self, i: int, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor | None
    ) -> torch.Tensor:
        """Layer ``i``: concatenate the skip on channels, ResNet, spatial transformer, motion module."""
        x = self.resnets[i](torch.cat([x, skip], dim=1), temb)
        if self.attentions is not None:
            x = self.attentions[i](x, audio)
        if self.motion_modules is not None:
            x = self.motion_modules[i](x)
        return x

    def upsample(self, x: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        return x if self.upsamplers is None else self.upsamplers[0](x, size)

    def forward(
        self, x: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor,
        audio: torch.Tensor | None = None, upsample_size: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        for i in range(len(self.resnets)):
            x = self.layer(i, x, skips[-1 - i], temb, audio)  # skips are consumed deepest first
        return self.upsample(x, upsample_size)
