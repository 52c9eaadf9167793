"""The block's element-wise work around the GEMMs, written as few passes as the math allows.

Each function here replaces a chain of separate ops in the block (LayerNorm -> modulate -> cast,
q/k RMSNorm -> cast -> RoPE -> cast, bf16 branch -> fp32 copy -> gate -> residual add) with one
expression that keeps no fp32 copy the math does not need. Inside a compiled block (``DiTRuntime.
compile_blocks``) inductor fuses each into one kernel; in an eager run on a GPU ``maybe_compiled``
gives each its own compiled kernel; on CPU they run as the plain torch code below (the fallback).
Each has an ``*_reference`` twin: the unfused chain the block used before, which the tests compare
them with (tests/test_dit_speed.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["modulated_layer_norm", "gated_residual", "rms_norm_rope", "maybe_compiled"]


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm(x) (fp32, no affine) * (1 + scale) + shift, cast to the GEMM dtype: one pass."""
    return torch.addcmul(shift, F.layer_norm(x.float(), x.shape[-1:], eps=eps), 1 + scale).to(out_dtype)


def modulated_layer_norm_reference(x, shift, scale, eps, out_dtype):
    return (F.layer_norm(x.float(), x.shape[-1:], eps=eps) * (1 + scale) + shift).to(out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate computed in fp32, returned in x's dtype (the residual stream's: fp32, or bf16 as an
    option); gate fp32, y the bf16 branch output.

    addcmul promotes y inside the kernel, so autograd keeps y in bf16 instead of an fp32 copy of it.
    """
    return torch.addcmul(x, y, gate).to(x.dtype)


def gated_residual_reference(x, y, gate):
    return (x.float() + y.float() * gate).to(x.dtype)


def rope_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The release's RoPE precision: float64 for fp32 activations, fp32 for bf16/fp16 ones."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def rms_norm_rope(x: torch.Tensor, sum_sq: torch.Tensor, weight: torch.Tensor, dim: int, eps: float,
                  cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's q/k path after the statistic: x * rsqrt(mean sq) * weight, split into heads, RoPE, cast.

    x [s, b, heads*d] (GEMM dtype); sum_sq [s, b, 1] fp32, the per-token sum of squares over all
    ``dim`` features (already all-reduced over TP); cos, sin [s, 1, 1, d/2]. Returns [s, b, heads, d]
    in x's dtype. The normalised values stay in the RoPE precision instead of being rounded to bf16
    and read back, so it is one pass (and, for bf16, one rounding fewer than the unfused chain).
    """
    compute = rope_compute_dtype(x.dtype)
    normed = x.float() * torch.rsqrt(sum_sq / dim + eps) * weight.float()
    pairs = normed.to(compute).unflatten(-1, (heads, -1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(compute), sin.to(compute)
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def rms_norm_rope_reference(x, sum_sq, weight, dim, eps, cos, sin, heads):
    from megawan.layers.rope import apply_rope

    normed = (x.float() * torch.rsqrt(sum_sq / dim + eps) * weight.float()).to(x.dtype)
    return apply_rope(normed.unflatten(-1, (heads, -1)), cos, sin)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def maybe_compiled(fn, x: torch.Tensor):
    """``fn`` compiled on its own when x is on a GPU and we are not already inside a compiled region
    (there the whole block is one graph); the plain function otherwise (CPU, or tracing)."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return _compiled(fn)
    return fn
