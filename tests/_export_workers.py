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
    from megawan.train import load_config
    from megawan.training.trainer import Trainer

    trainer = Trainer(load_config("tiny_1x", argv))  # builds megatron DDP: not under no_grad
    assert trainer.resume() is not None
    torch.set_grad_enabled(False)
    model = trainer.model.eval()
    x, t, text = case
    plain = model(x, t, text)
    ema = {name: v.clone() for name, v in trainer.ema.named_tensors()}
    for name, p in model.named_parameters():
        p.copy_(ema[name])
    with_ema = model(x, t, text)
    exported = WanDiT.from_pretrained(official_export, groups=trainer.groups, runtime=DiTRuntime()).eval()
    return {"plain": plain, "ema_out": with_ema, "ema": ema, "official": exported(x, t, text)}
