"""The main job end to end: 1X data -> sharded VAE encode -> DiT step at the main job's TP2 x CP2 layout,
equal to one rank (a replicated and a TP-split gradient), one verdict line, startup errors said once."""

from __future__ import annotations

import logging

import pytest

from megawan.testing import run_distributed
from megawan.parallel_state.launch import STARTUP_ERROR_EXIT
from megawan.tools import forward_demo
from megawan.tools.make_sample_data import make_sample_data


def _run_demo(data, tp, cp):
    report = forward_demo.main(["--data", str(data), "--tp", str(tp), "--cp", str(cp), "--clip-frames", "9",
                                "--size", "64"])
    report["data_log_level"] = logging.getLogger("megawan.data").getEffectiveLevel()
    return report


def test_forward_demo_matches_single_rank(tmp_path):
    root = make_sample_data(tmp_path, train_shards=1, val_shards=0, frames_per_shard=48, size=64, gop=8,
                            min_segment=20, max_segment=30, captioned_videos=0, workers=1)
    reports = run_distributed(_run_demo, 4, root / "train_v2.0_raw", 2, 2)
    for r in reports:
        assert r["layout"] == {"tp": 2, "cp": 2, "dp": 1, "sequence_parallel": True}
        assert r["latents"] == [1, 48, 3, 4, 4] and r["tokens"] == 12
        assert abs(r["loss"] - r["loss_single_rank"]) <= 1e-5 * abs(r["loss_single_rank"])
        assert r["velocity_rel_diff"] <= 1e-5
        assert r["grad_rel_diff"] <= 1e-5  # replicated (patch embedding)
        assert r["grad_tp_split"].startswith("blocks.") and r["grad_tp_split_rel_diff"] <= 1e-5
        assert r["bad_input_skipped"] == {} and r["bad_input_skipped_by_dp_rank"] == {0: {}}
        # the files' problems are the same on every rank: only rank 0 logs them
        assert r["data_log_level"] == (logging.WARNING if r["rank"] == 0 else logging.ERROR)
        assert r["verdict"].startswith("PASS: TP2 x CP2 x DP1 step vs the single-rank run agree")


def test_verdict_names_what_is_off():
    good = {"loss_rel_diff": 1e-7, "velocity_rel_diff": 2e-7, "grad_rel_diff": 1e-7, "grad_tp_split_rel_diff": 3e-7}
    layout = {"tp": 2, "cp": 2, "dp": 1}
    assert forward_demo._verdict([good, good], layout).startswith("PASS")
    off = dict(good, grad_tp_split_rel_diff=0.3)
    line = forward_demo._verdict([good, off], layout)
    assert line.startswith("FAIL") and "grad_tp_split_rel_diff above the tolerance" in line
    assert "FAIL" in forward_demo._verdict([dict(good, velocity_rel_diff=float("nan"))], layout)


def test_a_layout_error_is_said_once_without_a_traceback(tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as exit_:
        forward_demo.main(["--data", str(tmp_path), "--tp", "3"])  # 1 rank cannot hold TP3
    assert exit_.value.code == STARTUP_ERROR_EXIT
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("LayoutError") == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("FAIL: the job did not start: LayoutError: world size 1") and "(rule: " in last
