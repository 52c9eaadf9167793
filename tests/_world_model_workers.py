"""Rank functions of tests/test_world_model.py (run through megawan.testing.distributed.run_distributed)."""

from __future__ import annotations

import torch

from megawan import parallel_state
from megawan.training.config import load_config


def train_run(overrides: dict) -> dict | None:
    """Train the tiny_1x preset with ``overrides``; rank 0 returns the trainer's result."""
    from megawan.training.trainer import Trainer

    trainer = Trainer(load_config("tiny_1x", overrides))
    result = trainer.fit()
    rank = torch.distributed.get_rank()
    parallel_state.destroy()
    return result if rank == 0 else None


def memo_latents(overrides: dict, batches: int) -> dict:
    """Latents of the first ``batches`` batches of two epochs, with and without the in-memory latent memo."""
    from megawan.training.data import TrainingData

    out = {}
    groups = None
    for memo in (False, True):
        cfg = load_config("tiny_1x", {**overrides, "data": {**overrides["data"], "memo_latents": memo}})
        groups = groups or parallel_state.initialize(cfg.parallel.tp, cfg.parallel.cp, seed=0)
        data = TrainingData(cfg.data, groups, text_dim=64, text_len=512, seed=0, with_states=True)
        it = data.batches()
        per_epoch = len(data.loader)
        got = [next(it) for _ in range(per_epoch + batches)]  # a whole epoch, then the next epoch's first
        out[memo] = {"latents": [b.latents for b in got], "states": [b.states for b in got],
                     "memo_size": len(data.memo) if data.memo is not None else None, "per_epoch": per_epoch}
    parallel_state.destroy()
    return out
