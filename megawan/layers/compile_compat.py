"""megatron-core's linears inside ``torch.compile``: two stand-ins, installed by ``install()``.

Both keep megatron's eager behaviour bit for bit and change only what dynamo cannot trace:

* ``RowParallelLinear`` without sequence parallelism exits the TP region through
  ``_ReduceFromModelParallelRegion``, whose forward all-reduces its input in place and returns it.
  Eager autograd accepts that; dynamo refuses a custom Function returning a modified input. Inside a
  compiled region the stand-in all-reduces a copy instead (same values, same identity backward).
* megatron's linear function resolves ``tp_group=None`` through ``get_tensor_model_parallel_group_if_none``,
  which warns on rank 0 at every call when megatron's global state is not initialised (megawan passes
  its groups explicitly): a graph break per row-parallel layer. The stand-in returns the same default
  group silently.

Used by ``megawan.models.dit.compile_blocks``; the other half of compiling megatron's layers (its
linear function's async collectives) is megawan's own linear function, megawan/layers/tp_gemm.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan import compat

_INSTALLED = False


class _ReduceFromTPRegion(torch.autograd.Function):
    """All-reduce (sum) over the TP group of a copy of the input; backward: identity (as megatron's)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def install() -> None:
    """Install both stand-ins in megatron-core's layers module; idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core import parallel_state as mps
    from megatron.core.tensor_parallel import layers as mlayers

    eager_reduce = compat.require(mlayers, "reduce_from_tensor_model_parallel_region", ("input_", "group"))
    compat.require(mlayers, "get_tensor_model_parallel_group_if_none",
                   ("tp_group", "is_expert", "check_initialized"))

    def reduce_from_tensor_model_parallel_region(input_, group=None):
        if not torch.compiler.is_compiling():
            return eager_reduce(input_, group=group)
        group = mlayers.get_tensor_model_parallel_group_if_none(group)
        return input_ if group.size() == 1 else _ReduceFromTPRegion.apply(input_, group)

    def get_tensor_model_parallel_group_if_none(tp_group, is_expert=False, check_initialized=True):
        if not dist.is_initialized():
            return None
        if tp_group is not None or not mps.is_initialized():
            return tp_group
        if is_expert:
            return mps.get_expert_tensor_parallel_group(check_initialized=check_initialized)
        return mps.get_tensor_model_parallel_group(check_initialized=check_initialized)

    mlayers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
    mlayers.get_tensor_model_parallel_group_if_none = get_tensor_model_parallel_group_if_none
    _INSTALLED = True
