"""Rank functions for the DiT's multi-process tests (spawned by megawan.testing.run_distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.parallel_state.grads import reduce_model_parallel_grads


def _grad_full(p, groups):
    """The whole gradient of a TP-split parameter; a fused one (stride s) holds s slices per rank."""
    g = p.grad
    if getattr(p, "tensor_model_parallel", False) and groups.tp > 1:
        ranks = [torch.empty_like(g) for _ in range(groups.tp)]
        dist.all_gather(ranks, g.contiguous(), group=groups.tp_group)
        stride, dim = p.partition_stride, p.partition_dim
        pieces = [r.chunk(stride, dim=dim) for r in ranks]
        g = torch.cat([torch.cat([pc[i] for pc in pieces], dim=dim) for i in range(stride)], dim=dim)
    return g.cpu()


def forward_layouts(ckpt_dir, cases, layouts, dtype=torch.float32):
    """Run every input case under every (tp, cp, sequence_parallel) layout; rank 0 returns outputs."""
    results = {}
    for tp, cp, sp in layouts:
        groups = parallel_state.initialize(tp, cp)
        model = WanDiT.from_pretrained(ckpt_dir, dtype=dtype, groups=groups,
                                       runtime=DiTRuntime(sequence_parallel=sp, linear_impl="local"))
        model.eval()
        with torch.no_grad():
            for name, (x, t, text) in cases.items():
                dev = groups.device
                out = model(x.to(dev), t.to(dev), text.to(dev)).float().cpu()
                results[(tp, cp, sp, name)] = out
        del model
    return results if dist.get_rank() == 0 else None


def backward_layout(ckpt_dir, case, weight, tp, cp, sp=True, checkpointing=False, states=None):
    """Loss = sum(out * weight); return output, latent grad and full (TP-gathered) parameter grads."""
    groups = parallel_state.initialize(tp, cp)
    model = WanDiT.from_pretrained(ckpt_dir, groups=groups, runtime=DiTRuntime(
        sequence_parallel=sp, linear_impl="local", activation_checkpointing=checkpointing))
    model.train()
    dev = groups.device
    x, t, text = (v.to(dev) for v in case)
    x.requires_grad_(True)
    out = model(x, t, text, states=None if states is None else states.to(dev))
    (out * weight.to(dev)).sum().backward()
    reduce_model_parallel_grads(model, groups)
    grads = {n: _grad_full(p, groups) for n, p in model.named_parameters()}
    if dist.get_rank() == 0:
        return out.detach().cpu(), x.grad.cpu(), grads
    return None
