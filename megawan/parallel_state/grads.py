"""Gradient reductions implied by megawan's TP / SP / CP layout (outside megatron's DDP).

Under sequence parallelism, replicated parameters tagged ``sequence_parallel`` hold partial
gradients (from this rank's tokens): they are summed over TP. Under context parallelism every
gradient is a partial sum over the CP ranks' tokens: summed over CP. Data-parallel averaging is
the trainer's business (megatron DDP reduces over DP x CP there); this function serves inference
tools, tests and single-replica runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan.parallel_state import ParallelGroups


@torch.no_grad()
def all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` over ``group`` in place with one collective (flattened into one buffer per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def reduce_model_parallel_grads(model: torch.nn.Module, groups: ParallelGroups) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if groups.tp > 1:
        sp = [p.grad for p in model.parameters() if p.grad is not None and getattr(p, "sequence_parallel", False)]
        if sp:
            all_reduce_flat(sp, groups.tp_group)
    if groups.cp > 1 and grads:
        all_reduce_flat(grads, groups.cp_group)
