"""The EMA: sharded like the distributed optimizer's state, the average of the fp32 master weights, checkpointed
in a form that reshards, counted in the memory estimate, and scored by validation when it is on.

Closed form: after k steps with decay d from e_0 = m_0 (the master weights when training starts),
    e_k = d^k m_0 + (1 - d) sum_{j=1..k} d^(k - j) m_j,
checked at d = 0.7 (at 0.5 a decay swapped with 1 - d would pass) on every rank of TP2 x DP2, within 1e-6
relative per tensor (fp32: each lerp rounds once).
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from megawan.models.dit_config import WanDiTConfig
from megawan.testing import run_distributed
from megawan.training.budget import dit_param_counts, estimate_memory
from tests import _semantics_workers as sw
from tests import _train_workers as w
from tests._train_workers import rel

DECAY = 0.7
EMA_TOL = 1e-6
WEIGHT_TOL = 1e-3  # after Adam steps in another layout (tests/test_train.py)


@pytest.fixture(scope="module")
def data_root(sample_1x):
    return sample_1x / "train_v2.0_raw"


def _tiny(data_root, out, **extra) -> dict:
    base = {"parallel.tp": 1, "parallel.cp": 1, "validation.rollout_every": 0, "model.dtype": "bfloat16",
            "optim.ema_decay": DECAY, "validation.root": str(data_root.parent / "val_v2.0_raw")}
    return w.tiny_overrides(data_root, out, **{**base, **extra})


def _closed_form(series: list[dict], decay: float, k: int) -> dict:
    return {n: decay**k * series[0][n] + sum((1 - decay) * decay ** (k - j) * series[j][n] for j in range(1, k + 1))
            for n in series[0]}


@pytest.fixture(scope="module")
def trajectory(data_root, tmp_path_factory):
    """3 bf16 steps at TP2 x DP2: every rank's master weights, bf16 weights and EMA after each step."""
    out = tmp_path_factory.mktemp("ema") / "run"
    return run_distributed(sw.ema_trajectory, 4, _tiny(data_root, out, **{"parallel.tp": 2}), 3, timeout_s=900)


def test_ema_is_the_closed_form_of_the_master_weights_on_every_rank(trajectory):
    for r in trajectory:
        for k in range(1, 4):
            expected = _closed_form(r["masters"], DECAY, k)
            errs = {n: rel(r["emas"][k][n], expected[n]) for n in expected}
            assert max(errs.values()) <= EMA_TOL, (r["rank"], k, max(errs.items(), key=lambda kv: kv[1]))
        # not the average of the bf16 weights, nor with the decay swapped
        from_bf16 = _closed_form(r["bf16_weights"], DECAY, 3)
        swapped = _closed_form(r["masters"], 1 - DECAY, 3)
        assert max(rel(r["emas"][3][n], from_bf16[n]) for n in from_bf16) > 100 * EMA_TOL
        assert max(rel(r["emas"][3][n], swapped[n]) for n in swapped) > 100 * EMA_TOL


def test_ema_is_sharded_like_the_optimizer_and_counted_in_the_estimate(trajectory):
    """Each DP x CP rank holds the EMA of its optimizer slice only: the slices of a TP rank's replicas add up
    to that rank's parameters once, and each is 1/dp of them (the estimate's 4 B / param over dp x cp)."""
    for tp_rank in (0, 1):
        reports = [r for r in trajectory if r["tp_rank"] == tp_rank]
        assert len(reports) == 2  # the two DP replicas
        params = reports[0]["local_param_numel"]
        assert sum(r["ema_numel"] for r in reports) == params
        for r in reports:
            assert abs(r["ema_numel"] - params / 2) <= 0.02 * params, (r["ema_numel"], params)
    cfg = dataclasses.replace(WanDiTConfig.preset("tiny"), state_dim=25)
    kw = dict(tokens=12, batch=1, tp=2, cp=1, dp=2)
    ema_bytes = estimate_memory(cfg, ema=True, **kw).optimizer - estimate_memory(cfg, ema=False, **kw).optimizer
    split, replicated = dit_param_counts(cfg)
    assert ema_bytes == pytest.approx(4 * (split / 2 + replicated) / 2)
    assert ema_bytes == pytest.approx(4 * trajectory[0]["ema_numel"], rel=0.02)


def test_the_ema_checkpoint_reshards_and_the_resumed_average_goes_on(data_root, tmp_path):
    """Saved at TP1 x DP2 after 2 steps: loaded at TP2 x CP2 every rank holds exactly the saved EMA and master
    weights; resumed at TP2 x DP1 (batch 2) for 2 more steps, the EMA follows the straight 4-step run's (fp32 weights:
    the layouts then differ by rounding only, as in tests/test_train.py)."""
    base = {"run.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 3, "model.dtype": "float32"}
    straight = run_distributed(sw.train, 2, _tiny(data_root, tmp_path / "run", **base), timeout_s=900)
    saved = tmp_path / "saved"
    shutil.copytree(tmp_path / "run", saved)
    shutil.rmtree(saved / "checkpoints" / "step_00000004")
    same = run_distributed(sw.resume_only, 2, _tiny(data_root, saved, **base))
    other = run_distributed(sw.resume_only, 4, _tiny(data_root, saved, **base, **{"parallel.tp": 2, "parallel.cp": 2}),
                            timeout_s=900)
    for r in same + other:
        assert r["step"] == 2 and "EMA (decay 0.7) continued from the checkpoint" in r["resume_note"]
        for n, t in same[0]["ema"].items():
            assert torch.equal(r["ema"][n], t), (r["rank"], n)
            assert torch.equal(r["master"][n], same[0]["master"][n]), (r["rank"], n)
    # the same global batch of 2: DP1 x batch 2
    resumed = run_distributed(sw.train, 2, _tiny(data_root, saved, **base, **{"parallel.tp": 2, "data.batch_size": 2}),
                              timeout_s=900)
    for r in resumed:
        assert r["result"]["step"] == 4
        for n, t in straight[0]["ema"].items():
            assert rel(r["ema"][n], t) <= WEIGHT_TOL, (r["rank"], n)
        assert max(rel(r["ema"][n], r["master"][n]) for n in r["ema"]) > 10 * WEIGHT_TOL  # an average


def test_validation_and_rollouts_score_the_ema_weights_and_put_the_trained_ones_back(data_root, tmp_path):
    """validate("ema") and rollouts("ema") equal validating / rolling out a model that holds the gathered EMA;
    afterwards the weights and the master weights are bit for bit what they were, on every rank of DP2."""
    reports = run_distributed(sw.evaluate_with_ema, 2, _tiny(data_root, tmp_path / "run", **{
        "validation.num_clips": 2, "validation.rollout_clips": 1, "validation.rollout_steps": 2}), 2,
        timeout_s=900)
    for r in reports:
        assert r["weights_unchanged"] and r["master_unchanged"]
        assert r["raw_again"] == r["raw"]
        assert r["ema"]["loss"] == pytest.approx(r["by_hand"]["loss"], rel=1e-6)
        assert abs(r["ema"]["loss"] - r["raw"]["loss"]) > 1e-4 * r["raw"]["loss"]
        assert r["ema"] == reports[0]["ema"]
        for key in ("latent_mse_mean", "psnr_last"):
            assert r["rollout_ema"][key] == pytest.approx(r["rollout_by_hand"][key], rel=1e-5), key
        assert r["rollout_ema"]["latent_mse_mean"] != r["rollout_raw"]["latent_mse_mean"]
