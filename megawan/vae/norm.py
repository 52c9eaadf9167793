"""RMS norm over channels at each pixel (no statistics across pixels, so spatial tiles need no exchange)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """``x / rms_over_channels(x) * gamma``, channels first; ``gamma`` keeps the released shape
    ``[c, 1, 1, 1]`` for video tensors and ``[c, 1, 1]`` for per-frame (image) tensors."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16/fp16 sums of squares over 1024 channels lose precision: normalise in fp32
        y = F.normalize(x.float(), dim=1).to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) \
            else F.normalize(x, dim=1)
        return y * (self.scale * self.gamma)
