"""Wan's 3D rotary position embedding: (frame, row, col) axes, interleaved complex pairs.

``head_dim / 2`` complex pairs are split [d/2 - 2*(d//6), d//6, d//6] over (frame, row, col); axis
``a`` with ``n`` pairs uses frequencies theta^(-2j / (2n)). Tables are built in float64 as in the
release; they cover exactly the tokens a rank attends from (its CP chunk of the padded
sequence), with global positions, and padded tokens get the identity rotation.
"""

from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    side = head_dim // 6
    return head_dim // 2 - 2 * side, side, side


def rope_tables(head_dim: int, grid: tuple[int, int, int], start: int, end: int, num_tokens: int,
                theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [end - start, 1, 1, head_dim / 2] (float64) for tokens [start, end).

    Token index i < num_tokens sits at (f, h, w) = unravel(i, grid); i >= num_tokens is padding.
    """
    f_n, h_n, w_n = grid
    idx = torch.arange(start, end, device=device)
    valid = idx < num_tokens
    idx = idx.clamp(max=num_tokens - 1)
    pos = (idx // (h_n * w_n), (idx // w_n) % h_n, idx % w_n)
    angles = []
    for n_pairs, p in zip(axis_pairs(head_dim), pos):
        inv_freq = theta ** (-torch.arange(n_pairs, dtype=torch.float64, device=device) * 2 / (2 * n_pairs))
        angles.append(p.to(torch.float64)[:, None] * inv_freq[None, :])
    angle = torch.cat(angles, dim=1) * valid[:, None]
    return angle.cos()[:, None, None, :], angle.sin()[:, None, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x [s, b, h, d]; fp32/fp64 inputs in float64, others in fp32."""
    compute = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.to(compute).unflatten(-1, (-1, 2))
    even, odd = xc[..., 0], xc[..., 1]
    cos, sin = cos.to(compute), sin.to(compute)
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
