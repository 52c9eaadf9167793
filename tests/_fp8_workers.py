"""Rank functions for the FP8 tests (spawned by megawan.testing.run_distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.parallel_state.grads import reduce_model_parallel_grads
from tests._dit_workers import _grad_full


def fp8_backward_layouts(ckpt_dir, case, weight, fp8, layouts):
    """Per (tp, cp, sequence_parallel) layout, bf16 weights and GEMMs in ``fp8`` mode: loss = sum(out * weight);
    every rank returns {layout: (output, latent grad, full parameter grads)} as it holds them (the output and
    latent grad complete on every rank, the TP-split grads gathered)."""
    results = {}
    for tp, cp, sp in layouts:
        groups = parallel_state.initialize(tp, cp)
        model = WanDiT.from_pretrained(ckpt_dir, dtype=torch.bfloat16, groups=groups,
                                       runtime=DiTRuntime(sequence_parallel=sp, linear_impl="local", fp8=fp8))
        model.train()
        x, t, text = (v.to(groups.device).clone() for v in case)  # a fresh leaf per layout
        x.requires_grad_(True)
        out = model(x, t, text)
        (out.float() * weight).sum().backward()
        reduce_model_parallel_grads(model, groups)
        grads = {n: _grad_full(p, groups).float() for n, p in model.named_parameters()}
        results[(tp, cp, sp)] = (out.detach().float().cpu(), x.grad.float().cpu().clone(), grads)
        del model
    return results
