"""Rank functions for tests/test_export.py (spawned by megawan.testing.run_distributed)."""

from __future__ import annotations

import torch


def train(argv):
    from megawan.train import main

    return main(argv)


def export(ckpt, jobs, tp):
    """Several exports (dicts of export() keyword arguments) from one job of ``tp`` ranks."""
    from megawan import parallel_state
    from megawan.tools.export import export as run

    for job in jobs:
        run(ckpt, tp=tp, **job)
    parallel_state.destroy()


def loaded_back(argv, case, official_export):
    """The trainer's own resume path at tp = 1: the model's velocity on ``case``, the same with the EMA
    weights, the EMA tensors themselves, and the velocity of the official-layout export read back."""
    from megawan.models.dit import WanDiT
    from megawan.models.dit_config import DiTRuntime
    from megawan.training.config import load_config
    from megawan.training.trainer import Trainer

    trainer = Trainer(load_config("tiny_1x", argv))  # builds megatron DDP: not under no_grad
    assert trainer.resume() is not None
    torch.set_grad_enabled(False)
    model = trainer.model.eval()
    x, t, text, *states = case
    states = states[0] if states else None
    out = {"plain": model(x, t, text, states=states)}
    if model.state_embedding is not None:
        out["state_weight_norm"] = model.state_embedding.linear_2.weight.norm().item()
    exported = WanDiT.from_pretrained(official_export, groups=trainer.groups, runtime=DiTRuntime()).eval()
    out["official"] = exported(x, t, text, states=states)
    if trainer.ema is not None:
        out["ema"] = trainer.ema.full_tensors()  # tp = 1: whole tensors
        for name, p in model.named_parameters():
            p.copy_(out["ema"][name])
        out["ema_out"] = model(x, t, text, states=states)
    return out
