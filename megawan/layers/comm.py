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


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, group=group)
    return x


def _adjoint_pair(name: str, forward, backward):
    """``op(x, group)``: ``forward(x, group)`` with backward ``backward(grad, group)``; identity on 1 rank."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})

    def op(x: torch.Tensor, group) -> torch.Tensor:
        return x if _world(group) == 1 else fn.apply(x, group)

    return op


# Every rank sees the same loss: a gather's backward keeps this rank's slice, and a slice of a
# replicated tensor gathers the gradients back.
gather_dim0 = _adjoint_pair("GatherDim0", _all_gather_dim0, _own_slice_dim0)
slice_dim0 = _adjoint_pair("SliceDim0", _own_slice_dim0, _all_gather_dim0)
# A sum over ranks where each rank's result feeds a different part of the loss: the gradient of
# each input is the sum of all ranks' output gradients.
all_reduce_sum = _adjoint_pair("AllReduceSum", _all_reduce, _all_reduce)


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


# An all-to-all is a permutation: its backward is the inverse all-to-all.
# Ulysses: [s/c, b, h, d] (local tokens, all local heads) <-> [s, b, h/c, d] (all tokens, h/c heads).
ulysses_heads_to_seq = _adjoint_pair("UlyssesHeadsToSeq", _heads_to_seq, _seq_to_heads)
ulysses_seq_to_heads = _adjoint_pair("UlyssesSeqToHeads", _seq_to_heads, _heads_to_seq)
