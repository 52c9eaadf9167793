"""The DiT's collectives: megatron-core's mappings, plus the two pieces megatron-core lacks.

All tensors follow megatron's [s, b, ...] order: the sequence is dim 0. A group of ``None`` (a
parallel size of 1) makes every op the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    all_to_all,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megawan.utils import group_size


def gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather dim 0; backward keeps this rank's slice (every rank computes the same loss)."""
    if group_size(group) == 1:
        return x
    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group)


def slice_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of dim 0 of a replicated tensor; backward all-gathers the gradient."""
    return x if group_size(group) == 1 else scatter_to_sequence_parallel_region(x, group=group)


class _AllReduceSum(torch.autograd.Function):
    # megatron-core's reduce_from_tensor_model_parallel_region has an identity backward; here each
    # rank's sum feeds a different part of the loss (the q/k norm statistic of its own heads), so
    # the gradient of each input is the sum of all ranks' output gradients: an all-reduce too.
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _AllReduceSum.apply(x, group)


# Ulysses: [s/c, b, h, d] (local tokens, all local heads) <-> [s, b, h/c, d] (all tokens, h/c heads).
# megatron-core's all_to_all sp2hp/hp2sp helpers split the last dim of a 2-D [tokens, hidden]
# tensor; these keep heads whole and the [s, b, h, d] layout. Its differentiable all_to_all does the
# exchange (backward: the inverse all-to-all); the reshapes around it are plain autograd ops.

def ulysses_heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[s/c, b, h, d] -> [s, b, h/c, d]: send head group j to rank j, receive every rank's tokens."""
    n = group_size(group)
    if n == 1:
        return x
    s, b, h, d = x.shape
    x = x.reshape(s, b, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    return all_to_all(group, x).reshape(n * s, b, h // n, d)


def ulysses_seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[s, b, h/c, d] -> [s/c, b, h, d]: the inverse of ``ulysses_heads_to_seq``."""
    n = group_size(group)
    if n == 1:
        return x
    s, b, h, d = x.shape
    x = all_to_all(group, x.reshape(n, s // n, b, h, d).contiguous())
    return x.permute(1, 2, 0, 3, 4).reshape(s // n, b, n * h, d)
