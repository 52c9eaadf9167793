"""The trainer: parallel equals single-process, exact resume, resharded resume, crash-safe checkpoints,
signals, dead ranks, NaN batches and bad configs.

Tolerances (fp32 on CPU): a TP2 x CP2 step reorders reductions only, so its loss is within 1e-5 of the
single-process loss (relative), and so is the global gradient norm (which Adam's update is blind to: a
gradient off by a constant factor would still give the same weights). After a few Adam steps the weights
are compared per tensor relative to the tensor's norm, bound 1e-3: Adam divides by sqrt(v) and so
amplifies rounding in elements whose gradient is near zero (measured worst: 1.5e-4, a cross-attention
bias, after 3 steps at TP2 x CP2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest
import torch

from megawan.testing import run_distributed
from megawan.training.config import ConfigError, load_config
from tests import _train_workers as w
from tests._train_workers import max_param_err, rel

LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-3


@pytest.fixture(scope="module")
def data_root(sample_1x):
    return sample_1x / "train_v2.0_raw"


# The GPU default: compiled blocks (one graph per block, collectives traced) with recomputation inside it.
COMPILED = {"model.compile_blocks": True, "model.activation_checkpointing": True,
            "model.recompute_granularity": "selective"}


@pytest.mark.parametrize("four_ranks", [{}, COMPILED], ids=["eager", "compiled-selective"])
def test_tp2_cp2_training_matches_single_process(data_root, tmp_path, four_ranks):
    steps = 3
    one = run_distributed(w.train, 1, w.tiny_overrides(data_root, tmp_path / "one", **{
        "run.steps": steps, "parallel.tp": 1, "parallel.cp": 1}))[0]
    every = run_distributed(w.train, 4, w.tiny_overrides(data_root, tmp_path / "four", **{
        "run.steps": steps, "parallel.tp": 2, "parallel.cp": 2, **four_ranks}), timeout_s=1200)
    four = every[0]
    assert len(one["losses"]) == len(four["losses"]) == steps
    assert abs(four["losses"][0] - one["losses"][0]) <= LOSS_TOL * abs(one["losses"][0])
    for a, b in zip(four["grad_norms"], one["grad_norms"]):  # before clipping: the true global norm
        assert abs(a - b) <= 10 * LOSS_TOL * b, (four["grad_norms"], one["grad_norms"])
    for a, b in zip(four["losses"], one["losses"]):
        assert abs(a - b) <= 10 * LOSS_TOL * abs(b), (four["losses"], one["losses"])
    for r in every:  # both TP ranks of both CP ranks hold the single-process weights
        err = max_param_err(r["params"], one["params"])
        assert err <= WEIGHT_TOL, (r["rank"], err)
    # the weights did move, every tensor by more than the tolerance (the least, a norm weight starting at 1,
    # by 2.9e-3; most by 4-9e-2): a layout that left any tensor at its initial value would fail the comparison
    start = run_distributed(w.initial_weights, 1, w.tiny_overrides(data_root, tmp_path / "start", **{
        "parallel.tp": 1, "parallel.cp": 1}))[0]
    moved = {k: rel(one["params"][k], start[k]) for k in start}
    assert min(moved.values()) > WEIGHT_TOL, min(moved.items(), key=lambda kv: kv[1])


def test_resume_is_bitwise_equal_to_a_straight_run(data_root, tmp_path):
    straight = run_distributed(w.train, 2, w.tiny_overrides(data_root, tmp_path / "a", **{
        "run.steps": 4, "parallel.tp": 2, "parallel.cp": 1}))[0]
    split = w.tiny_overrides(data_root, tmp_path / "b", **{"run.steps": 4, "parallel.tp": 2, "parallel.cp": 1,
                                                          "run.exit_after_steps": 2})
    first = run_distributed(w.train, 2, split)[0]
    assert first["result"]["step"] == 2 and os.path.isdir(tmp_path / "b" / "checkpoints" / "step_00000002")
    seconds = run_distributed(w.train, 2, split)
    second = seconds[0]
    assert second["result"]["step"] == 4
    assert second["losses"] == straight["losses"]  # metrics.jsonl appends: steps 1-2 then 3-4
    for r in seconds:  # both TP ranks
        for k, v in straight["params"].items():
            assert (r["params"][k] == v).all(), (r["rank"], k)


@pytest.fixture(scope="module")
def saved_at_tp2_dp2(data_root, tmp_path_factory):
    """A straight 3-step run at TP2 x CP1 x DP2, and the same run stopped (checkpointed) after step 2."""
    root = tmp_path_factory.mktemp("reshard")
    base = {"run.steps": 3, "parallel.tp": 2, "parallel.cp": 1}
    everyone = run_distributed(w.train, 4, w.tiny_overrides(data_root, root / "straight", **base))
    straight = everyone[0]
    for r in everyone[1:]:  # the other TP rank and the second DP replica hold the same weights
        for k, v in straight["params"].items():
            assert torch.equal(r["params"][k], v), (r["rank"], k)
    run_distributed(w.train, 4, w.tiny_overrides(data_root, root / "saved", **base, **{"run.exit_after_steps": 2}),
                    False)
    return straight, root / "saved"


@pytest.mark.parametrize("tp,cp,world", [(1, 2, 4), (4, 1, 4)])
def test_resume_into_another_layout(data_root, saved_at_tp2_dp2, tmp_path, tp, cp, world):
    """Saved at TP2 x CP1 x DP2; resumed at TP1 x CP2 x DP2 and TP4 x DP1 (same global batch of 2)."""
    straight, saved = saved_at_tp2_dp2
    shutil.copytree(saved, tmp_path / "re")
    batch = 2 // (world // (tp * cp))
    every = run_distributed(w.train, world, w.tiny_overrides(data_root, tmp_path / "re", **{
        "run.steps": 3, "parallel.tp": tp, "parallel.cp": cp, "data.batch_size": batch}))
    resumed = every[0]
    assert resumed["result"]["step"] == 3
    assert abs(resumed["losses"][-1] - straight["losses"][-1]) <= LOSS_TOL * abs(straight["losses"][-1])
    # the step after the resume used the restored Adam moments: the weights follow the straight run, on
    # every TP / CP rank and DP replica
    for r in every:
        assert max_param_err(r["params"], straight["params"]) <= WEIGHT_TOL, r["rank"]


def test_a_rank_killed_during_a_checkpoint_write_leaves_the_last_one_loadable(data_root, tmp_path, caplog):
    over = w.tiny_overrides(data_root, tmp_path / "run", **{"run.steps": 4, "parallel.tp": 2, "parallel.cp": 1,
                                                           "checkpoint.every": 1})
    os.environ["MEGAWAN_DIST_TIMEOUT_S"] = "20"
    try:
        # whichever the harness sees first: rank 1's death, or rank 0's collective failing because of it
        with pytest.raises(RuntimeError, match="rank 1 exited with code -9|(closed|reset) by peer"):
            run_distributed(w.die_in_second_save, 2, over, timeout_s=300, grace_s=2)
    finally:
        del os.environ["MEGAWAN_DIST_TIMEOUT_S"]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == [".tmp-step_00000002", "step_00000001"], ckpts
    again = run_distributed(w.train, 2, over)[0]
    assert again["result"]["step"] == 4
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ".tmp-step_00000002" not in names and "step_00000004" in names
    first_losses = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")]
    # step 2 was redone from step 1's checkpoint; its first record was dropped at the resume
    assert [r["step"] for r in first_losses if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_checkpoints_and_the_resume_continues(data_root, tmp_path, signum):
    over = w.tiny_overrides(data_root, tmp_path / "run", **{"run.steps": 5, "parallel.tp": 2, "parallel.cp": 1})
    stopped = run_distributed(w.train_with_signal, 2, over, 2, signum)[0]
    assert stopped["result"]["preempted"] and stopped["result"]["step"] == 2
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000002")
    resumed = run_distributed(w.train, 2, over, False)[0]
    assert resumed["result"]["step"] == 5 and not resumed["result"]["preempted"]
    assert len(resumed["losses"]) == 5  # 2 before the signal, 3 after


def test_a_signal_during_start_up_is_not_lost(data_root, tmp_path):
    over = w.tiny_overrides(data_root, tmp_path / "run", **{"run.steps": 5, "parallel.tp": 2, "parallel.cp": 1})
    stopped = run_distributed(w.signal_during_startup, 2, over)[0]
    assert stopped["result"]["preempted"] and stopped["result"]["step"] == 0
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step_00000000")


def test_a_dead_rank_ends_the_others_within_the_collective_timeout(data_root, tmp_path):
    over = w.tiny_overrides(data_root, tmp_path / "run", **{"run.steps": 6, "parallel.tp": 2, "parallel.cp": 1})
    os.environ["MEGAWAN_DIST_TIMEOUT_S"] = "30"
    try:
        with pytest.raises(RuntimeError, match="rank 1 exited with code 3"):
            run_distributed(w.die_at_step, 2, over, 2, str(tmp_path / "rank0.json"), timeout_s=300, grace_s=90)
    finally:
        del os.environ["MEGAWAN_DIST_TIMEOUT_S"]
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["outcome"] != "completed" and report["seconds"] < 60, report


def test_nan_batches_are_skipped_counted_then_stop_the_run(data_root, tmp_path):
    over = w.tiny_overrides(data_root, tmp_path / "run", **{"parallel.tp": 2, "parallel.cp": 1,
                                                           "optim.max_nonfinite_in_a_row": 3})
    r = run_distributed(w.nan_batches, 2, over, 3)[0]
    assert r["moved_by_good"] and r["unchanged_by_nan"]
    assert [o["skipped_nonfinite"] for o in r["outcomes"][:2]] == [1, 1]
    assert "TrainingError: 3 steps in a row had a non-finite loss" in r["outcomes"][2]
    assert r["nonfinite_total"] == 3


@pytest.mark.parametrize("override,message", [
    (["--optim.lrr", "1"], "unknown config key optim.lrr"),
    (["--optim.lr", "fast"], "optim.lr: expected float"),
    (["--model.dtype", "fp16"], "model.dtype: must be one of"),
    (["--data.clip_frames", "16"], "data.clip_frames must be 4n + 1"),
    (["--objective.clean_frames", "9"], "objective.clean_frames=9 leaves nothing to predict"),
    (["--objective.sigma_sampler", "cosine"], "objective: sigma_sampler must be one of"),
    (["--parallel.tp"], "override --parallel.tp has no value"),
    (["--tp", "2"], "use --section.key"),
    (["--run.steps", "40", "--optim.warmup_steps", "40"], "optim.warmup_steps=40 must be < run.steps=40"),
])
def test_a_bad_config_is_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny_1x", override)


def test_a_bad_layout_is_refused_before_any_compute(capsys):
    from megawan import train

    with pytest.raises(SystemExit) as e:
        train.main(["--config", "tiny_1x", "--parallel.tp", "3"])
    assert e.value.code == 3
    assert "world size 1 is not divisible by tp=3 x cp=2" in capsys.readouterr().err


def test_the_5b_on_a_24_gib_host_is_refused_naming_the_figures(monkeypatch):
    from megawan.training import trainer

    # the preset's model and sample shape, without the released files (no download here)
    cfg = load_config("ti2v5b_1x", {"model": {"init": None, "dit": "wan2.2-ti2v-5b",
                                              "activation_checkpointing": False},
                                    "data": {"source": "1x", "size": [512, 512]}, "parallel": {"cp": 4}})
    monkeypatch.setattr(trainer, "device_capacity_bytes", lambda device: 24 * 2**30 / 4)
    with pytest.raises(trainer.MemoryBudgetError) as e:
        trainer.check_memory(cfg, trainer.model_config(cfg), 4, torch.device("cpu"))
    msg = str(e.value)
    assert "tp=1 x cp=4 on 4 ranks needs about" in msg and "weights" in msg and "optimizer" in msg
    assert "more than the 6.0 GiB this rank has" in msg and "no layout of these ranks fits" in msg
    # the same model on 64 GB devices: refused at cp=1 without checkpointing, naming the smallest layout that
    # fits (on 80 GB it fits since the EMA is sharded: 72.5 GiB)
    monkeypatch.setattr(trainer, "device_capacity_bytes", lambda device: 64e9)
    cfg1 = load_config("ti2v5b_1x", {"model": {"init": None, "dit": "wan2.2-ti2v-5b",
                                               "activation_checkpointing": False},
                                     "data": {"source": "1x", "size": [512, 512]}, "parallel": {"cp": 1}})
    with pytest.raises(trainer.MemoryBudgetError, match="72.5 GiB .* a layout that fits: --parallel.tp 1 "
                                                        "--parallel.cp 2$"):
        trainer.check_memory(cfg1, trainer.model_config(cfg1), 8, torch.device("cpu"))


def test_an_fp8_run_tracks_the_bf16_loss_curve_and_resumes_as_bf16(data_root, tmp_path):
    """model.fp8 reaches the blocks' GEMMs through the trainer; the curve stays within 5% of the bf16 one
    (measured on CPU: under 1%) and the FP8 run's checkpoint continues as a bf16 run."""
    base = {"run.steps": 6, "parallel.tp": 1, "parallel.cp": 1, "model.dtype": "bfloat16"}
    ref = run_distributed(w.train, 1, w.tiny_overrides(data_root, tmp_path / "bf16", **base), False)[0]
    fp8 = run_distributed(w.train, 1, w.tiny_overrides(data_root, tmp_path / "fp8", **base, **{
        "model.fp8": "native-rowwise", "run.exit_after_steps": 4}), False)[0]
    assert fp8["result"]["step"] == 4
    for a, b in zip(fp8["losses"], ref["losses"]):
        assert abs(a - b) <= 0.05 * b, (fp8["losses"], ref["losses"])
    assert fp8["losses"] != ref["losses"][:4]  # the FP8 GEMMs did run
    back = run_distributed(w.train, 1, w.tiny_overrides(data_root, tmp_path / "fp8", **base), False)[0]
    assert back["result"]["step"] == 6 and abs(back["losses"][-1] - ref["losses"][-1]) <= 0.05 * ref["losses"][-1]


def test_in_training_rollouts_are_scored_and_logged(data_root, tmp_path, capfd):
    """validation.rollout_every: the world model is rolled out on held-out clips and scored (PSNR / SSIM beside
    the copy-last-frame baseline) into metrics.jsonl and TensorBoard, with its contact sheet. Validation and
    rollouts show their progress as training does (output not a terminal: a line when each starts and when it
    ends, with the rate)."""
    over = w.tiny_overrides(data_root, tmp_path / "run", **{
        "run.steps": 2, "parallel.tp": 1, "parallel.cp": 1, "logging.tensorboard": True,
        "validation.root": str(data_root.parent / "val_v2.0_raw"), "validation.rollout_every": 2,
        "validation.rollout_clips": 1, "validation.rollout_steps": 2,
        "validation.every": 2, "validation.num_clips": 2, "logging.progress_bar": True})
    capfd.readouterr()
    run_distributed(w.train, 1, over, False)
    out, err = capfd.readouterr()
    for line in ("validation clips (read and encoded once): 0/2 clips (0%)", "step 2 validation: 0/2 clips (0%)",
                 "step 2 rollout: 0/"):
        assert line in out + err, (line, out, err)
    rate = r", [\d.]+ (s/clip|clips/s)"
    assert re.search(r"^validation clips \(read and encoded once\): 2/2 clips \(100%\)" + rate, out, re.M), out
    assert re.search(r"^step 2 validation: 2/2 clips \(100%\)" + rate, out, re.M), out
    assert re.search(r"^step 2 rollout: (\d+)/\1 rollouts \(100%\), [\d.]+ (s/rollout|rollouts/s)", out, re.M), out
    records = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")]
    rollouts = [r for r in records if r["kind"] == "rollout"]
    assert len(rollouts) == 1 and rollouts[0]["step"] == 2 and rollouts[0]["num_clips"] == 1
    for key in ("psnr_last", "psnr_mean"):
        assert 0 < rollouts[0][key] < 100 and 0 < rollouts[0]["baseline_" + key] < 100, rollouts[0]
    for key in ("ssim_last", "ssim_mean"):
        assert -1 <= rollouts[0][key] <= 1 and -1 <= rollouts[0]["baseline_" + key] <= 1, rollouts[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "logs" / "tensorboard"), size_guidance={"images": 4})
    events.Reload()
    assert "eval/rollout" in events.Tags()["images"]
