"""Convolutions of the Wan 2.2 VAE that stream over time and shard over space.

Time: the VAE runs chunk by chunk (encode: frame 0, then 4 frames; decode: one latent frame at a time).
Every temporal-kernel conv keeps the last 2 frames of its input in ``StreamContext.cache`` and prepends
them to the next chunk, with zeros in front of the first frame: chunked output equals a causal conv over
the whole clip.

Space: 3x3 windows read one row/column from neighbour tiles through ``pad_with_halo``, applied AFTER the
cached frames are prepended, so caches hold only this rank's tile and never need to be exchanged.

Weights: on CPU, oneDNN copies a convolution's whole weight into its blocked layout on every call. That
temporary is as large as the weight (108 MiB for a 1024 -> 1024 3x3x3 conv) and does not shrink with the
tile, so large weights are applied in groups of output channels (``conv_by_output_groups``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from megawan.vae.halo import pad_with_halo
from megawan.vae.partition import SpatialPartition

CACHED_FRAMES = 2  # temporal kernel 3, causal: each output frame reads its 2 predecessors
WEIGHT_GROUP_BYTES = 8 * 2 ** 20  # CPU: largest weight slice one convolution call reorders at a time


@dataclass
class StreamContext:
    """State of one encode or decode call: the tile partition, per-module frame caches, chunk position."""

    part: SpatialPartition
    cache: dict = field(default_factory=dict)
    first_chunk: bool = True


def prepend_history(module: nn.Module, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
    """``[prev frames | x]`` padded with zeros in front to 2 extra frames; caches the last 2 frames."""
    prev = ctx.cache.get(module)
    seq = x if prev is None else torch.cat([prev, x], dim=2)
    # clone: a view would keep the whole chunk alive until the next call
    ctx.cache[module] = seq[:, :, -CACHED_FRAMES:].clone()
    missing = CACHED_FRAMES + x.shape[2] - seq.shape[2]
    return F.pad(seq, (0, 0, 0, 0, missing, 0)) if missing else seq


def conv_by_output_groups(conv, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          stride=1) -> torch.Tensor:
    """``conv(x, weight, bias, stride)`` (F.conv2d / F.conv3d), on CPU split into groups of output channels
    whose weight slice is at most ``WEIGHT_GROUP_BYTES``, each written into one preallocated output.

    Each output channel is still one kernel's reduction over all input channels and taps, so the result is
    the same up to float rounding (bit-identical with oneDNN and with the im2col fallback on the AVX-512 CPU
    this was first measured on; oneDNN may pick another kernel for another channel count elsewhere, so
    tests/test_vae.py bounds the difference by 1e-6 relative, not bit equality);
    the oneDNN weight-reorder temporary becomes one slice instead of the whole weight. Other devices and
    small weights take a single call.
    """
    per_channel = weight[0].numel() * weight.element_size()
    group = max(16, WEIGHT_GROUP_BYTES // per_channel // 16 * 16)  # multiples of oneDNN's 16-channel blocks
    if x.device.type != "cpu" or group >= weight.shape[0]:
        return conv(x, weight, bias, stride)
    out = None
    for start in range(0, weight.shape[0], group):
        stop = min(start + group, weight.shape[0])
        part = conv(x, weight[start:stop], None if bias is None else bias[start:stop], stride)
        if out is None:
            out = part.new_empty(part.shape[0], weight.shape[0], *part.shape[2:])
        out[:, start:stop] = part
        del part
    return out


class CausalConv3d(nn.Conv3d):
    """Conv3d with kernel 1 or 3 per axis: causal in time (cached history), 'same' in space (halos)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3):
        super().__init__(in_channels, out_channels, kernel_size, padding=0)
        kt, kh, kw = self.kernel_size
        if kt not in (1, 3) or kh not in (1, 3) or kh != kw:
            raise ValueError(f"unsupported causal conv kernel {self.kernel_size}")

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        kt, kh, _ = self.kernel_size
        if kt == 3:
            x = prepend_history(self, x, ctx)
        if kh == 3:
            x = pad_with_halo(x, ctx.part)
        return conv_by_output_groups(F.conv3d, x, self.weight, self.bias)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame of ``[b, c, t, h, w]``."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Downsample(nn.Module):
    """2x spatial downsample (pad right/bottom, 3x3 stride-2 conv), optionally 2x in time.

    With tiles starting on even rows, output row i reads input rows 2i..2i+2: one row from the tile
    below and none from above, so the halo is one-sided. The temporal conv (kernel 3, stride 2, no
    padding) sees the previous chunk's last frame; the first chunk (frame 0 alone) passes through.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        x = pad_with_halo(x, ctx.part, top=0, bottom=1, left=0, right=1)
        x = _per_frame(lambda f: conv_by_output_groups(F.conv2d, f, self.conv.weight, self.conv.bias,
                                                       self.conv.stride), x)
        if self.time_conv is None:
            return x
        prev = ctx.cache.get(self.time_conv)
        ctx.cache[self.time_conv] = x[:, :, -1:].clone()
        if prev is None:
            return x
        return self.time_conv(torch.cat([prev, x], dim=2))


class Upsample(nn.Module):
    """2x nearest spatial upsample + 3x3 conv, optionally 2x in time first.

    The halo row is taken at low resolution (half the bytes) and upsampled with the tile, then cropped
    to the one row the 3x3 window needs. The temporal conv maps c -> 2c channels, read as two output
    frames per input frame; the first chunk (latent frame 0) is not doubled, as in the release.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3)
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        if self.time_conv is not None:
            if self.time_conv in ctx.cache:
                b, c, t, h, w = x.shape
                x = self.time_conv(x, ctx)  # [b, 2c, t, h, w] -> frames (t, 2) interleaved
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            else:  # first chunk: no temporal doubling; history starts (empty) with the next chunk
                ctx.cache[self.time_conv] = x.new_empty(*x.shape[:2], 0, *x.shape[3:])
        x = pad_with_halo(x, ctx.part)

        def up_conv(frames: torch.Tensor) -> torch.Tensor:
            up = F.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
            return conv_by_output_groups(F.conv2d, up[..., 1:-1, 1:-1], self.conv.weight, self.conv.bias)

        return _per_frame(up_conv, x)
