"""Rank functions for the trainer's multi-process tests (spawned by megawan.testing.run_distributed)."""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.checkpoint.dit_io import iter_full_state
from megawan.training.config import load_config
from megawan.training.trainer import Trainer


def write_prompt(path, text_dim: int = 64, length: int = 7, seed: int = 0) -> str:
    """A prompt embedding file like the latent cache's empty_prompt.safetensors (random: with all-zero text
    every key of cross-attention is equal, its q / k gradients vanish and Adam turns their rounding noise
    into full-size steps, which no layout comparison can match)."""
    from safetensors.torch import save_file

    save_file({"text_embeds": torch.randn(length, text_dim, generator=torch.Generator().manual_seed(seed))},
              str(path))
    return str(path)


def rel(a, b) -> float:
    """|a - b| / |b| (norms), the training comparisons' measure."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_param_err(a: dict, b: dict) -> float:
    """The largest ``rel`` over the tensors of two weight dicts with the same keys."""
    assert set(a) == set(b)
    return max(rel(a[k], b[k]) for k in a)


def tiny_overrides(data_root, out_dir, **extra) -> dict:
    """The tiny_1x preset made small and fast: 9-frame clips at 64 x 64 (3 latent frames of 4 tokens)."""
    tree = {"run": {"out_dir": str(out_dir), "steps": 4},
            "data": {"root": str(data_root), "clip_frames": 9, "size": [64, 64], "batch_size": 1, "window_hop": 1,
                     "empty_prompt": str(os.path.join(os.path.dirname(str(data_root)), "prompt.safetensors"))},
            "objective": {"clean_frames": 1, "shift": 1.0}, "optim": {"warmup_steps": 0},
            "checkpoint": {"every": 0, "keep": 3}, "validation": {"every": 0, "rollout_every": 0},
            "logging": {"progress_bar": False, "tensorboard": False, "every": 100}}
    return with_dotted(tree, extra)


def with_dotted(tree: dict, extra: dict) -> dict:
    """``tree`` with each ``"section.key": value`` of ``extra`` set in it (the command line's override form)."""
    for key, value in extra.items():
        node = tree
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _train_records(out_dir, key: str = "loss") -> list[float]:
    path = os.path.join(out_dir, "logs", "metrics.jsonl")
    return [r[key] for r in map(json.loads, open(path)) if r["kind"] == "train"]


def _full_params(trainer) -> dict:
    return {k: t.detach().float().cpu().clone() for k, t in iter_full_state(trainer.model)}


def train(overrides: dict, return_params: bool = True):
    """Run (or resume) a training run; every rank returns its full weights (its TP slices gathered) and the
    result, rank 0 also the losses and grad norms of metrics.jsonl."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    result = trainer.fit()
    params = _full_params(trainer) if return_params else None  # collective over TP
    g = trainer.groups
    out = {"rank": dist.get_rank(), "tp_rank": g.tp_rank, "cp_rank": g.cp_rank, "dp_rank": g.dp_rank,
           "params": params, "result": result, "nonfinite": trainer.nonfinite_total}
    if dist.get_rank() == 0:
        out_dir = overrides["run"]["out_dir"]
        out.update(losses=_train_records(out_dir), grad_norms=_train_records(out_dir, "grad_norm"))
    parallel_state.destroy()
    return out


def initial_weights(overrides: dict) -> dict:
    """The full weights a run starts from (built, not trained)."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    params = _full_params(trainer)
    parallel_state.destroy()
    return params


def train_with_signal(overrides: dict, at_step: int, signum: int):
    """Rank 0 receives ``signum`` right after step ``at_step`` (as a scheduler's signal would arrive)."""
    original = Trainer.train_step

    def step_then_signal(self, micro):
        metrics = original(self, micro)
        if self.step + 1 == at_step and dist.get_rank() == 0:
            os.kill(os.getpid(), signum)
        return metrics

    Trainer.train_step = step_then_signal
    return train(overrides, return_params=False)


def die_in_second_save(overrides: dict):
    """Rank 1 is SIGKILLed while it writes the second checkpoint (after some of its files exist)."""
    from megawan.training import checkpointing

    saves = {"n": 0}
    original = checkpointing.dist_checkpointing.save

    def save(sd, path, *a, **k):
        saves["n"] += 1
        if saves["n"] == 2 and dist.get_rank() == 1:
            with open(os.path.join(path, "partial_write"), "w") as f:
                f.write("torn")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(sd, path, *a, **k)

    checkpointing.dist_checkpointing.save = save
    return train(overrides, return_params=False)


def die_at_step(overrides: dict, step: int, report_file: str):
    """Rank 1 dies at ``step``; rank 0 records how its training loop ended and how long that took."""
    original = Trainer.train_step

    def step_or_die(self, micro):
        if self.step == step and dist.get_rank() == 1:
            os._exit(3)
        if self.step == step:
            step_or_die.start = time.monotonic()
        return original(self, micro)

    Trainer.train_step = step_or_die
    try:
        train(overrides, return_params=False)
        outcome = "completed"
    except Exception as e:  # noqa: BLE001 - whatever the collective raised
        outcome = f"{type(e).__name__}: {e}"
    with open(report_file, "w") as f:
        json.dump({"outcome": outcome, "seconds": time.monotonic() - getattr(step_or_die, "start", 0)}, f)
    os._exit(0)  # the process group lost a peer: skip its teardown


def nan_batches(overrides: dict, max_in_a_row: int):
    """Feed NaN latents: each step is skipped and counted, weights unchanged; then the run stops."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    batch = next(trainer.data.batches())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    good = trainer.train_step([batch])
    after_good = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    bad = type(batch)(batch.latents.clone(), batch.text, batch.states)
    bad.latents[0, :, -1, 0, 0] = float("nan")
    outcomes = []
    for _ in range(max_in_a_row):
        try:
            outcomes.append(trainer.train_step([bad]))
        except RuntimeError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
    unchanged = all(torch.equal(after_good[n], p) for n, p in trainer.model.named_parameters())
    moved = any(not torch.equal(before[n], after_good[n]) for n in before)
    parallel_state.destroy()
    return {"good": good, "outcomes": outcomes, "unchanged_by_nan": unchanged, "moved_by_good": moved,
            "nonfinite_total": trainer.nonfinite_total}


def signal_during_startup(overrides: dict):
    """SIGUSR1 arrives while the trainer is still building (as a scheduler may send it): not lost."""
    from megawan.training import trainer as trainer_module

    original = trainer_module.check_memory

    def check_then_signal(*args, **kwargs):
        if dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    trainer_module.check_memory = check_then_signal
    return train(overrides, return_params=False)
