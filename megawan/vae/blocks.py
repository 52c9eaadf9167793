"""Residual blocks, parameter-free shortcuts and the down/up stages of the Wan 2.2 VAE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megawan.vae.attention import FrameAttention
from megawan.vae.conv import CausalConv3d, Downsample, StreamContext, Upsample
from megawan.vae.norm import RMSNorm


class ResidualBlock(nn.Module):
    """shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))); shortcut is a 1x1x1 conv if widths differ."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3)
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x, ctx)
        x = self.conv1(F.silu(self.norm1(x), inplace=True), ctx)
        x = self.conv2(F.silu(self.norm2(x), inplace=True), ctx)
        return x.add_(skip)


def space_time_to_channel_mean(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Parameter-free down shortcut: fold (factor_t x factor_s x factor_s) blocks into channels, ordered
    (c, t, h, w), then average consecutive groups down to ``out_dim`` channels. An odd frame count gets a
    zero frame in front (the first chunk of one frame)."""
    b, c, t, h, w = x.shape
    pad_t = (-t) % factor_t
    if pad_t:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        t += pad_t
    x = x.view(b, c, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    group = c * factor_t * factor_s * factor_s // out_dim
    return x.reshape(b, out_dim, group, t // factor_t, h // factor_s, w // factor_s).mean(dim=2)


def channel_to_space_time_repeat(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int,
                                 first_chunk: bool) -> torch.Tensor:
    """Parameter-free up shortcut: repeat each channel, unfold the copies into (t, h, w) blocks. On the
    first chunk the temporal copies before the last are dropped (latent frame 0 -> one video frame)."""
    b, c, t, h, w = x.shape
    repeats = out_dim * factor_t * factor_s * factor_s // c
    x = x.repeat_interleave(repeats, dim=1).view(b, out_dim, factor_t, factor_s, factor_s, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, out_dim, t * factor_t, h * factor_s, w * factor_s)
    return x[:, :, factor_t - 1:] if first_chunk else x


class DownStage(nn.Module):
    """Residual blocks, then an optional spatial (and temporal) downsample, plus the averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, downsample: bool, temporal: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_blocks
        self.resnets = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.resample = Downsample(out_dim, temporal) if downsample else None
        self.out_dim = out_dim
        self.factor_s = 2 if downsample else 1
        self.factor_t = 2 if downsample and temporal else 1

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        skip = space_time_to_channel_mean(x, self.out_dim, self.factor_t, self.factor_s)
        for block in self.resnets:
            x = block(x, ctx)
        if self.resample is not None:
            x = self.resample(x, ctx)
        return x + skip


class UpStage(nn.Module):
    """Residual blocks, then an optional spatial (and temporal) upsample, plus the repeating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, upsample: bool, temporal: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_blocks
        self.resnets = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.resample = Upsample(out_dim, temporal) if upsample else None
        self.out_dim = out_dim
        self.factor_t = 2 if upsample and temporal else 1

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        x_in = x  # the shortcut is 8x larger than its input: build it last, keep the input meanwhile
        for block in self.resnets:
            x = block(x, ctx)
        if self.resample is None:
            return x
        x = self.resample(x, ctx)
        return x.add_(channel_to_space_time_repeat(x_in, self.out_dim, self.factor_t, 2, ctx.first_chunk))


class MidBlock(nn.Module):
    """ResidualBlock -> per-frame attention -> ResidualBlock, at latent resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attn = FrameAttention(dim)

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        x = self.resnets[0](x, ctx)
        x = self.attn(x, ctx.part)
        return self.resnets[1](x, ctx)
