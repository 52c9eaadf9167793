"""The VAE's mid-block attention: single head, per frame, over all pixels of the latent-resolution frame.

It is the only op of the Wan 2.2 VAE whose output pixel depends on far-away pixels. Under spatial
sharding each rank keeps the queries of its own tile and all-gathers keys and values (2/3 of the qkv
activation, not the block input), so the attention itself is exact; only the summation order over keys
differs from the unsharded call (fp32 rounding, ~1e-7).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megawan.vae.norm import RMSNorm
from megawan.vae.partition import SpatialPartition


def gather_tokens(x: torch.Tensor, part: SpatialPartition) -> torch.Tensor:
    """``[n, tokens_of_my_tile, c]`` -> ``[n, tokens_of_all_tiles, c]`` (tile order; token order is irrelevant
    to attention). Tiles may differ in size: pad to the largest for all_gather, then drop the padding."""
    if not part.sharded:
        return x
    counts = [h * w for h, w in (part.tile_shape(1, t) for t in part.all_tiles())]
    longest = max(counts)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[1]))
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=part.group)
    if part.stats is not None:
        part.stats.gather_bytes += padded.numel() * padded.element_size() * (len(counts) - 1)
    return torch.cat([p[:, :n] for p, n in zip(parts, counts)], dim=1)


class FrameAttention(nn.Module):
    """x + proj(attention(qkv(rms_norm(x)))) for every frame; head_dim = channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, part: SpatialPartition) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if part.tile_shape(1) != (h, w):
            raise RuntimeError(f"mid attention expects the latent-resolution tile {part.tile_shape(1)}, got {(h, w)}")
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2)  # [bt, hw, 3c]
        q, k, v = qkv.chunk(3, dim=-1)
        kv = gather_tokens(torch.cat([k, v], dim=-1).contiguous(), part)  # one gather for K and V
        k, v = kv.chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        out = self.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)
