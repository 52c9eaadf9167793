"""Rank functions for tests/test_train_restart.py (spawned by megawan.testing.run_distributed)."""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

from megawan import parallel_state
from megawan.training import checkpointing
from megawan.training.config import load_config
from megawan.training.trainer import Trainer, TrainingError
from tests._train_workers import _train_records


def _close(trainer) -> None:
    getattr(trainer, "close", lambda: None)()  # releases the run folder's lock


def _reason(trainer) -> str | None:
    choice = getattr(trainer, "resume_choice", None)
    return choice.reason if choice is not None else None


def _metrics_records(overrides: dict) -> list[dict]:
    """Every record of the run's logs/metrics.jsonl."""
    import json

    with open(os.path.join(overrides["run"]["out_dir"], "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_and_tell(overrides: dict) -> dict:
    """Train (or resume); every rank reports the step it resumed at and what the trainer logged (the resume
    choice and its reason come first), rank 0 the chosen reason."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("megawan.train")
    log.addHandler(handler)
    level, _ = log.level, log.setLevel(logging.INFO)  # as the command line's rank 0 logs
    try:
        trainer = Trainer(load_config("tiny_1x", overrides))
        original = trainer.resume
        seen = {}

        def resume():
            path = original()
            seen["resumed_step"], seen["resumed_from"] = trainer.step, str(path) if path else None
            return path

        trainer.resume = resume
        result = trainer.fit()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    out = {"result": result, "reason": _reason(trainer), "log": lines, **seen}
    if dist.get_rank() == 0:
        out["losses"] = _train_records(overrides["run"]["out_dir"])
        out["steps"] = _train_records(overrides["run"]["out_dir"], "step")
    parallel_state.destroy()
    return out


def build_only(overrides: dict) -> str:
    """Construct the trainer (and close it): what a start-up check refuses is raised here."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    _close(trainer)
    parallel_state.destroy()
    return "built"


def stale_listing_on_rank_1(overrides: dict) -> dict:
    """Rank 1's view of the checkpoint folder lags behind (a shared file system's attribute cache): it sees
    only the older checkpoints. All ranks must still resume the same step, the one rank 0 chose."""
    original = checkpointing.complete_checkpoints

    def lagging(root):
        found = original(root)
        return found[:-1] if int(os.environ["RANK"]) == 1 else found

    checkpointing.complete_checkpoints = lagging
    trainer = Trainer(load_config("tiny_1x", overrides))
    original_resume = trainer.resume

    def resume():
        path = original_resume()
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, trainer.step)
        if len(set(steps)) != 1:
            raise AssertionError(f"ranks resumed different steps: {steps}")
        return path

    trainer.resume = resume
    result = trainer.fit()
    step = trainer.step
    parallel_state.destroy()
    return {"result": result, "step": step}


class _FailingReads:
    """A validation dataset whose reads fail on rank 1 at one step (a clip unreadable from one node)."""

    def __init__(self, dataset, trainer, at_step: int, seen: dict):
        self.dataset, self.trainer, self.at_step, self.seen = dataset, trainer, at_step, seen

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        t = self.trainer
        if t.step == self.at_step:
            marker = checkpointing.step_dir(t.ckpt_dir, t.step) / checkpointing.MARKER
            self.seen["checkpoint_before_validation"] = marker.exists()
            if dist.get_rank() == 1:
                raise OSError("planted: a validation clip could not be read")
        return self.dataset[item]


def fail_evaluation_on_rank_1(overrides: dict, at_step: int) -> dict:
    """Validation's first read fails on rank 1 only, at ``at_step`` (noting whether that step's checkpoint was on
    disk by then); the run must log it, skip that validation on every rank, and go on."""
    from megawan.training import trainer as trainer_module

    seen: dict = {}
    original_build = trainer_module.build_dataset
    holder: dict = {}

    def build_dataset(*args, **kwargs):  # the validation dataset, wrapped once the trainer exists
        dataset = original_build(*args, **kwargs)
        return _FailingReads(dataset, holder["trainer"], at_step, seen) if "trainer" in holder else dataset

    trainer_module.build_dataset = build_dataset
    trainer = Trainer(load_config("tiny_1x", overrides))
    holder["trainer"] = trainer
    if getattr(trainer, "_val_dataset", None) is not None:  # opened at start
        trainer._val_dataset = _FailingReads(trainer._val_dataset, trainer, at_step, seen)
    result = trainer.fit()
    out = {"result": result, **seen}
    if dist.get_rank() == 0:
        out["records"] = _metrics_records(overrides)
    parallel_state.destroy()
    return out


def count_vae_builds(overrides: dict) -> dict:
    """Train with rollouts; count how often a VAE is built for them."""
    from megawan.training import trainer as trainer_module

    calls = {"n": 0}
    original = trainer_module.build_vae

    def build_vae(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    trainer_module.build_vae = build_vae
    trainer = Trainer(load_config("tiny_1x", overrides))
    result = trainer.fit()
    out = {"result": result, "vae_builds": calls["n"]}
    if dist.get_rank() == 0:
        out["records"] = _metrics_records(overrides)
    parallel_state.destroy()
    return out


def save_again_and_die_between_renames(overrides: dict) -> None:
    """Train to run.steps (its checkpoint written), then save the same step again and die (as a SIGKILL or a
    power cut would) at the moment the new copy is renamed onto the step's name."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    trainer.fit()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(src)).startswith(checkpointing.TMP_PREFIX + checkpointing.PREFIX) and \
                os.path.basename(str(dst)).startswith(checkpointing.PREFIX):
            os._exit(9)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    trainer.save()


def nonfinite_then_resume(overrides: dict, before: int) -> dict:
    """``before`` NaN steps, a checkpoint, a new trainer resuming it, then one more NaN step."""
    trainer = Trainer(load_config("tiny_1x", overrides))
    batch = next(trainer.data.batches())
    bad = type(batch)(batch.latents.clone(), batch.text, batch.states)
    bad.latents[0, :, -1, 0, 0] = float("nan")
    for _ in range(before):
        trainer.train_step([bad])
    trainer.save()
    _close(trainer)
    again = Trainer(load_config("tiny_1x", overrides))
    again.resume()
    restored = {"total": again.nonfinite_total, "in_a_row": again.nonfinite_in_a_row}
    try:
        again.train_step([bad])
        outcome = "went on"
    except TrainingError as e:
        outcome = f"TrainingError: {e}"
    _close(again)
    parallel_state.destroy()
    return {"restored": restored, "outcome": outcome}


def die_at_step(overrides: dict, step: int) -> None:
    """Rank 0 dies (os._exit) at the start of step ``step``, after the earlier steps were logged."""
    original = Trainer.train_step

    def step_or_die(self, micro):
        if self.step + 1 == step:
            os._exit(3)
        return original(self, micro)

    Trainer.train_step = step_or_die
    trainer = Trainer(load_config("tiny_1x", overrides))
    trainer.fit()


def fsync_log_of_one_save(overrides: dict, log_path: str) -> dict:
    """Record every fsync (which file or folder, by which rank) during one checkpoint write, and which had
    happened when the completion marker was written."""
    real_fsync = os.fsync
    rank = int(os.environ["RANK"])

    def fsync(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = "?"
        with open(log_path, "a") as f:
            f.write(f"{rank} {target}\n")
        return real_fsync(fd)

    os.fsync = fsync  # megatron's forked writer processes inherit it
    synced_before_marker = []
    write_marker = getattr(checkpointing, "_write_marker", None)
    if write_marker is not None:
        def _write_marker(folder, marker):
            synced_before_marker.extend(open(log_path).read().splitlines())
            return write_marker(folder, marker)

        checkpointing._write_marker = _write_marker
    trainer = Trainer(load_config("tiny_1x", overrides))
    result = trainer.fit()
    parallel_state.destroy()
    return {"result": result, "synced_before_marker": synced_before_marker if write_marker else None}
