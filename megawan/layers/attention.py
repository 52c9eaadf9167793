"""Wan self- and cross-attention with tensor parallelism and context parallelism (Ulysses, ring, hybrid)."""

from __future__ import annotations

import torch
from torch import nn

from megawan.layers.backend import DiTBackend
from megawan.layers.comm import ulysses_heads_to_seq, ulysses_seq_to_heads
from megawan.layers.norms import HeadsRMSNorm
from megawan.layers.ring_attention import register_ring_group, ring_attention


class _Attention(nn.Module):
    """Shared by both attentions: o row-parallel, q/k RMSNorm across all heads (TP-exact)."""

    def __init__(self, dim: int, num_heads: int, eps: float, backend: DiTBackend):
        super().__init__()
        self.local_heads, self.head_dim = num_heads // backend.tp, dim // num_heads
        self.o = backend.row_parallel(dim, dim)
        self.norm_q = HeadsRMSNorm(dim, eps, backend.tp, backend.tp_group)
        self.norm_k = HeadsRMSNorm(dim, eps, backend.tp, backend.tp_group)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.local_heads, self.head_dim)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.o(x.flatten(2))
        return out


class SelfAttention(_Attention):
    """x: residual-stream shard [s_local, b, dim] -> same shape.

    q, k, v are one fused column-parallel layer (one gather of x under SP; this rank's rows are
    [q_r; k_r; v_r]). TP region: [s_cp, b, dim/tp] per rank (s_cp = this CP rank's tokens). Context
    parallelism (``backend.context_parallel``, a ``ContextParallelGroups``) of u x r ranks: Ulysses trades the split
    of the tokens over u ranks for a head split (all-to-all), so the u ranks together hold u
    consecutive CP chunks for heads/(tp*u) heads each; ring attention then spans the r such groups
    (megawan/layers/ring_attention.py). u = cp is pure Ulysses (the kernel sees the whole sequence),
    u = 1 pure ring.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, backend: DiTBackend):
        super().__init__(dim, num_heads, eps, backend)
        self.qkv = backend.column_parallel(dim, 3 * dim, stride=3)
        cp = backend.context_parallel
        self.ulysses_group, self.ring = cp.ulysses_group, cp.ring
        self.ring_group_name = register_ring_group(cp.ring_group) if cp.ring > 1 else None
        self.kernel = backend.attention_kernel(self.local_heads // cp.ulysses, self.head_dim)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], num_tokens: int):
        q, k, v = self.qkv(x)[0].chunk(3, dim=-1)
        q = self.norm_q.forward_rope(q, *rope, self.local_heads)
        k = self.norm_k.forward_rope(k, *rope, self.local_heads)
        v = self._heads(v)
        q, k, v = (ulysses_heads_to_seq(t, self.ulysses_group) for t in (q, k, v))
        if self.ring > 1:  # padding keys (the end of the global sequence) are dropped block by block
            out = ring_attention(q, k, v, self.ring_group_name, num_tokens)
        else:  # padding sits at the end of the global sequence: dropping those keys masks them exactly
            out = self.kernel(q, k[:num_tokens], v[:num_tokens])
        return self._out(ulysses_seq_to_heads(out, self.ulysses_group))


class CrossAttention(_Attention):
    """Video queries (local tokens) attend to all text tokens, replicated on every rank.

    ``context`` must already be in the TP region (replicated; its input grad all-reduced once per
    forward by the model), so k and v need no communication, and no CP communication is needed.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, backend: DiTBackend):
        super().__init__(dim, num_heads, eps, backend)
        self.q = backend.column_parallel(dim, dim)
        self.k = backend.column_parallel_on_replicated(dim, dim)
        self.v = backend.column_parallel_on_replicated(dim, dim)
        self.kernel = backend.attention_kernel(self.local_heads, self.head_dim)

    def forward(self, x, context):
        q = self._heads(self.norm_q(self.q(x)[0]))
        k = self._heads(self.norm_k(self.k(context)[0]))
        v = self._heads(self.v(context)[0])
        return self._out(self.kernel(q, k, v))


class FeedForward(nn.Module):
    """Linear(dim, ffn) -> GELU(tanh) -> Linear(ffn, dim), column- then row-parallel."""

    def __init__(self, dim: int, ffn_dim: int, backend: DiTBackend):
        super().__init__()
        self.fc1 = backend.column_parallel(dim, ffn_dim)
        self.fc2 = backend.row_parallel(ffn_dim, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)[0], approximate="tanh"))[0]
