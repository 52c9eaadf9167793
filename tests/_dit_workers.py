"""Rank functions for the DiT's multi-process tests (spawned by megawan.testing.run_distributed).

Every function returns this rank's results (never rank 0's only): the tests check that each rank,
in every TP / CP group and DP replica, holds the complete output and the same gradients.
"""

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
    return g.detach().cpu().clone()


def _residual_dtypes(model) -> set:
    """Record, for the residual stream entering every block and the head, its dtype and whether it holds
    bf16 precision only (every element exactly representable in bf16: rounded, whatever its dtype)."""
    seen = set()

    def record(_module, args):
        x = args[0]
        seen.add((x.dtype, bool((x.to(torch.bfloat16).to(x.dtype) == x).all())))

    for module in [*model.blocks, model.head]:
        module.register_forward_pre_hook(record)
    return seen


def forward_layouts(ckpt_dir, cases, layouts, dtype=torch.float32, residual_dtype=torch.float32):
    """Run every input case under every (tp, cp, sequence_parallel) layout.

    Returns {(tp, cp, sp, case): output} plus {"residual_dtypes": {(dtype, bf16-exact)} entering a block}.
    """
    results = {}
    dtypes = set()
    for tp, cp, sp in layouts:
        groups = parallel_state.initialize(tp, cp)
        model = WanDiT.from_pretrained(ckpt_dir, dtype=dtype, groups=groups,
                                       runtime=DiTRuntime(sequence_parallel=sp, linear_impl="local",
                                                          residual_dtype=residual_dtype))
        model.eval()
        seen = _residual_dtypes(model)
        with torch.no_grad():
            for name, (x, t, text) in cases.items():
                dev = groups.device
                out = model(x.to(dev), t.to(dev), text.to(dev)).float().cpu()
                results[(tp, cp, sp, name)] = out
        dtypes |= seen
        del model
    results["residual_dtypes"] = dtypes
    return results


def backward_layouts(ckpt_dir, case, weight, layouts, states=None):
    """Loss = sum(out * weight) under each (tp, cp, sp, activation_checkpointing) layout.

    Returns {layout: (output, latent grad, full (TP-gathered, model-parallel-reduced) parameter grads)}.
    """
    results = {}
    for tp, cp, sp, checkpointing in layouts:
        groups = parallel_state.initialize(tp, cp)
        model = WanDiT.from_pretrained(ckpt_dir, groups=groups, runtime=DiTRuntime(
            sequence_parallel=sp, linear_impl="local", activation_checkpointing=checkpointing))
        model.train()
        dev = groups.device
        # A fresh leaf per layout: on CPU .to() returns the caller's tensor, whose grad would accumulate.
        x, t, text = (v.detach().clone().to(dev) for v in case)
        x.requires_grad_(True)
        out = model(x, t, text, states=None if states is None else states.to(dev))
        (out * weight.to(dev)).sum().backward()
        reduce_model_parallel_grads(model, groups)
        grads = {n: _grad_full(p, groups) for n, p in model.named_parameters()}
        results[(tp, cp, sp, checkpointing)] = (out.detach().cpu().clone(), x.grad.cpu().clone(), grads)
        del model
    return results


def save_from_layout(ckpt_dir, out_dir, tp, cp, layout):
    """Load at TP x CP and save the whole model (gathered over TP, written by rank 0)."""
    groups = parallel_state.initialize(tp, cp)
    model = WanDiT.from_pretrained(ckpt_dir, groups=groups, runtime=DiTRuntime(linear_impl="local"))
    model.save_pretrained(out_dir, layout=layout, max_shard_bytes=2**20)
    return groups.tp_rank
