"""Megatron's tensor-parallel linear with synchronous collectives and a pluggable GEMM.

megatron-core's ``LinearWithGradAccumulationAndAsyncCommunication`` (the ``_forward_impl`` of its
Column/RowParallelLinear) overlaps the sequence-parallel re-gather of its input with the input-gradient
GEMM in backward through ``async_op=True`` collectives. ``torch.compile`` cannot trace those: every
linear becomes a graph break, so a compiled block at TP > 1 falls apart into pieces and cannot trace its
activation checkpoint. ``TPLinearFunction`` is the same computation with synchronous collectives
(megatron-core's own ``_gather_along_first_dim`` / ``_reduce_scatter_along_first_dim``, which dynamo
rewrites into traceable functional collectives; inductor then schedules and overlaps them itself):

* forward: all-gather the input's token shards (SP), GEMM, bias;
* backward: re-gather the input (only the local shard is kept, as Megatron does), input-gradient GEMM,
  then reduce-scatter it (SP) or all-reduce it (a column layer on a replicated input), weight- and
  bias-gradient GEMMs.

The GEMMs are a ``Gemm`` object: ``HighPrecisionGemm`` (the runtime dtype, megatron's math) or FP8
(``megawan.layers.fp8.Fp8Gemm``). Written here because megatron-core's linear function has no
synchronous mode and no GEMM hook; ``forward_impl`` is a drop-in for its ``_forward_impl``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim


class HighPrecisionGemm:
    """The GEMMs in the operands' dtype: megatron's own matmuls (x @ W^T, dy @ W, dy^T @ x)."""

    def forward(self, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x2, weight.t())

    def dgrad(self, g2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(g2, weight)

    def wgrad(self, g2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.matmul(g2.t(), x2).to(weight.dtype)

    def __repr__(self) -> str:
        return "HighPrecisionGemm()"


HIGH_PRECISION = HighPrecisionGemm()


class TPLinearFunction(torch.autograd.Function):
    """y = gather_SP(x) @ W^T + b with Megatron's backward collectives; see the module docstring."""

    @staticmethod
    def forward(ctx, input, weight, bias, gemm, allreduce_dgrad: bool, sequence_parallel: bool, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.gemm, ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = (
            gemm, allreduce_dgrad, sequence_parallel, tp_group)
        ctx.use_bias = bias is not None
        total = _gather_along_first_dim(input, tp_group) if sequence_parallel else input
        out = gemm.forward(total.reshape(-1, total.shape[-1]), weight)
        out = out.view(*total.shape[:-1], weight.shape[0])
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        gemm = ctx.gemm
        total = _gather_along_first_dim(input, ctx.tp_group) if ctx.sequence_parallel else input
        g2 = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = gemm.dgrad(g2, weight).view(*total.shape[:-1], weight.shape[1])
        if ctx.sequence_parallel:
            grad_input = _reduce_scatter_along_first_dim(grad_input, ctx.tp_group)
        elif ctx.allreduce_dgrad:
            dist.all_reduce(grad_input, group=ctx.tp_group)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = gemm.wgrad(g2, total.reshape(-1, total.shape[-1]), weight)
        grad_bias = g2.sum(0) if ctx.use_bias and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


def forward_impl(gemm=HIGH_PRECISION):
    """A drop-in for megatron's ``_forward_impl`` (same keyword arguments) running ``TPLinearFunction``."""

    def impl(input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False,
             sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None):
        if gradient_accumulation_fusion or grad_output_buffer is not None:
            raise NotImplementedError("megawan's TP linear function does not fuse gradient accumulation or "
                                      "defer weight gradients (megatron-core's does; megawan turns both off)")
        return TPLinearFunction.apply(input, weight, bias, gemm, allreduce_dgrad, sequence_parallel, tp_group)

    impl.gemm = gemm
    return impl


def use_gemm(layer, gemm) -> None:
    """Route a megatron-core local linear through ``TPLinearFunction`` with ``gemm``.

    Parameters, their TP attributes and the state dict are unchanged.
    """
    layer._forward_impl = forward_impl(gemm)


def gemm_of(layer):
    """The ``Gemm`` a layer runs through ``TPLinearFunction``, or None (megatron-core's own function)."""
    return getattr(layer.__dict__.get("_forward_impl"), "gemm", None)
