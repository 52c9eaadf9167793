"""The main job end to end: 1X data -> sharded VAE encode -> DiT step at CP2, equal to one rank."""

from __future__ import annotations

from megawan.testing import run_distributed
from megawan.tools import forward_demo
from megawan.tools.make_sample_data import make_sample_data


def _run_demo(data, tp, cp):
    return forward_demo.main(["--data", str(data), "--tp", str(tp), "--cp", str(cp), "--clip-frames", "9",
                              "--size", "64"])


def test_forward_demo_matches_single_rank(tmp_path):
    root = make_sample_data(tmp_path, train_shards=1, val_shards=0, frames_per_shard=48, size=64, gop=8)
    reports = run_distributed(_run_demo, 2, root / "train_v2.0_raw", 1, 2)
    for r in reports:
        assert r["latents"] == [1, 48, 3, 4, 4] and r["tokens"] == 12
        assert abs(r["loss"] - r["loss_single_rank"]) <= 1e-5 * abs(r["loss_single_rank"])
        assert r["velocity_rel_diff"] <= 1e-5
        assert r["grad_rel_diff"] <= 1e-5
