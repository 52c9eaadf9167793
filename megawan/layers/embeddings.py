"""Wan's input embeddings and output head (small layers, replicated on every rank, fp32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megawan.layers.norms import FP32LayerNorm


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] float64 sinusoid of t, halves ordered [cos, sin], frequencies 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class PatchEmbedding(nn.Conv3d):
    """Conv3d(kernel = stride = patch) applied as a linear map on patches cut out beforehand.

    Cutting patches first lets every rank embed only its own tokens. The parameter keeps the
    released Conv3d shape [dim, C, pt, ph, pw]; a patch vector is ordered (c, pt, ph, pw).
    """

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches.float(), self.weight.float().flatten(1), self.bias.float())


class WanHead(nn.Module):
    """LayerNorm (no affine), modulation by the time embedding e (shift, scale), Linear to patches."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x [s, b, dim] fp32; e [s or 1, b, dim] fp32
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unbind(2)
        return F.linear(self.norm(x) * (1 + scale) + shift, self.head.weight.float(), self.head.bias.float())


class StateEmbedding(nn.Module):
    """World-model conditioning: the robot states of one latent frame's video frames -> a [dim] vector.

    Input [B, F, frames_per_latent * state_dim] (fp32); MLP Linear -> SiLU -> Linear whose last layer
    starts at zero (adaLN-zero style), so a released checkpoint behaves exactly as released at step 0.
    """

    def __init__(self, state_dim: int, frames_per_latent: int, dim: int):
        super().__init__()
        self.state_dim, self.frames_per_latent = state_dim, frames_per_latent
        self.linear_1 = nn.Linear(state_dim * frames_per_latent, dim)
        self.linear_2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def group_frames(self, states: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """[B, T, state_dim] video-frame states, T = k * (F - 1) + 1 -> [B, F, k * state_dim].

        The causal VAE maps video frame 0 alone to latent frame 0 (its state is repeated k times) and
        frames k*(f-1)+1 .. k*f to latent frame f.
        """
        k = self.frames_per_latent
        first = states[:, :1].expand(-1, k, -1)
        grouped = torch.cat([first, states[:, 1:]], dim=1)
        return grouped.reshape(states.shape[0], num_latent_frames, k * self.state_dim)

    def forward(self, states: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        x = self.group_frames(states.float(), num_latent_frames)
        return self.linear_2(F.silu(self.linear_1(x)))
