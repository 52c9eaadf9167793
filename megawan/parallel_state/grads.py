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
def reduce_model_parallel_grads(model: torch.nn.Module, groups: ParallelGroups) -> None:
    for p in model.parameters():
        if p.grad is None:
            continue
        if groups.tp > 1 and getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=groups.tp_group)
        if groups.cp > 1:
            dist.all_reduce(p.grad, group=groups.cp_group)
