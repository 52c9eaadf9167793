"""The lines a training run ends with: ``done: step N`` when run.steps is reached, and a line saying it stopped
early, and why, when run.exit_after_steps ended this start first (the trainer's result says which)."""

from __future__ import annotations

from megawan.train import summary
from megawan.training.config import load_config


def _cfg(**overrides):
    return load_config("tiny_1x", [f"--{k}={v}" for k, v in overrides.items()])


def test_a_run_stopped_by_exit_after_steps_says_so_and_why():
    cfg = _cfg(**{"run.steps": 40, "run.exit_after_steps": 3, "run.out_dir": "outputs/x"})
    result = {"step": 22, "checkpoint": "outputs/x/checkpoints/step_00000022", "preempted": False,
              "stopped_early": True, "curves": None, "loss": 0.5}
    first = summary(result, cfg).splitlines()[0]
    assert first == ("stopped early: step 22 of run.steps 40, because run.exit_after_steps 3 steps were done in this "
                     "start; last loss 0.5000; rerun the same command to go on")


def test_a_finished_run_says_done():
    cfg = _cfg(**{"run.steps": 40, "run.out_dir": "outputs/x"})
    result = {"step": 40, "checkpoint": "outputs/x/checkpoints/step_00000040", "preempted": False,
              "stopped_early": False, "curves": None, "loss": 0.25}
    text = summary(result, cfg)
    assert text.splitlines()[0] == "done: step 40, last loss 0.2500"
    assert "  checkpoints: outputs/x/checkpoints (latest outputs/x/checkpoints/step_00000040)" in text
