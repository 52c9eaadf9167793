"""Autograd-aware collectives that megatron-core does not provide in the form megawan needs.

All tensors follow megatron's [s, b, ...] order: the sequence is dim 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _world(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _own_slice_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = _world(group)
    if n == 1:
        return x
    size = x.shape[0] // n
    rank = dist.get_rank(group)
    return x[rank * size:(rank + 1) * size].contiguous()


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, where every rank's result feeds a different part of the loss.

    The gradient of each rank's input is therefore the sum of all ranks' output gradients.
    """

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
    return x if _world(group) == 1 else _AllReduceSum.apply(x, group)


class _GatherDim0(torch.autograd.Function):
    """All-gather along dim 0; backward keeps this rank's slice (every rank sees the same loss)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice_dim0(grad, ctx.group), None


class _SliceDim0(torch.autograd.Function):
    """Take this rank's slice along dim 0 of a replicated tensor; backward all-gathers the grads."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_slice_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


def gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _GatherDim0.apply(x, group)


def slice_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return x if _world(group) == 1 else _SliceDim0.apply(x, group)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single on dim 0 of a contiguous tensor whose dim 0 has world-size chunks."""
    x = x.contiguous()  # empty_like would copy a non-contiguous layout that the collective ignores
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    # [s/c, b, h, d] -> [s, b, h/c, d]: send head group j to rank j, receive every rank's chunk.
    n = _world(group)
    s, b, h, d = x.shape
    x = x.reshape(s, b, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()
    return _all_to_all(x, group).reshape(n * s, b, h // n, d)


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    # [s, b, h/c, d] -> [s/c, b, h, d]: the inverse of _heads_to_seq.
    n = _world(group)
    s, b, h, d = x.shape
    x = _all_to_all(x.reshape(n, s // n, b, h, d), group)
    return x.permute(1, 2, 0, 3, 4).reshape(s // n, b, n * h, d)


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


def ulysses_heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Ulysses all-to-all: [s/c, b, h, d] (local tokens, all local heads) -> [s, b, h/c, d]."""
    return x if _world(group) == 1 else _HeadsToSeq.apply(x, group)


def ulysses_seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse Ulysses all-to-all: [s, b, h/c, d] -> [s/c, b, h, d]."""
    return x if _world(group) == 1 else _SeqToHeads.apply(x, group)
