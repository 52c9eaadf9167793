"""Normalisation layers, all computed in fp32 as the Wan release does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from megawan.layers import fused
from megawan.layers.comm import all_reduce_sum
from megawan.utils import group_size


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in fp32 (affine optional); returns fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class HeadsRMSNorm(nn.Module):
    """RMSNorm over all heads (Wan's q/k norm), exact under tensor parallelism.

    Each TP rank holds ``dim / tp`` features (its heads). The statistic spans the full ``dim``, so
    only the per-token sum of squares is all-reduced across TP (O(tokens) bytes), never q/k
    themselves. The weight is split like the column-parallel output: partition dim 0.
    """

    def __init__(self, dim: int, eps: float, tp: int, tp_group):
        super().__init__()
        self.dim, self.eps, self.tp_group = dim, eps, tp_group
        self.weight = nn.Parameter(torch.ones(dim // tp))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def sum_sq(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token sum of squares over all ``dim`` features, fp32 [..., 1] (all-reduced over TP)."""
        sum_sq = x.float().pow(2).sum(dim=-1, keepdim=True)
        if group_size(self.tp_group) > 1:
            sum_sq = all_reduce_sum(sum_sq, self.tp_group)
        return sum_sq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float() * torch.rsqrt(self.sum_sq(x) / self.dim + self.eps)
        return (out * self.weight.float()).to(x.dtype)

    def forward_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        """Normalise, split into ``heads`` and apply RoPE in one fused pass: [s, b, heads, d]."""
        args = (x, self.sum_sq(x), self.weight, self.dim, self.eps, cos, sin, heads)
        return fused.maybe_compiled(fused.rms_norm_rope, x)(*args)
