"""PSNR / SSIM against scikit-image and brute force; rollout scores, the baseline, DP-parallel evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megawan.evaluation.metrics import psnr, ssim
from megawan.evaluation.rollouts import score_clip
from megawan.pipelines.sampling import SamplingConfig
from megawan.testing import run_distributed
from tests import _sampling_workers as workers
from tests.sampling_fixtures import STATE_DIM, write_release


def _frames(n, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (1, h, w, 3), generator=g)
    noise = torch.randint(-40, 41, (n, h, w, 3), generator=g)
    return base.expand(n, -1, -1, -1).to(torch.uint8), (base + noise).clamp(0, 255).to(torch.uint8)


def test_psnr_matches_brute_force_and_scikit_image():
    a, b = _frames(3)
    got = psnr(a, b)
    for i in range(3):
        mse = np.mean((a[i].numpy().astype(np.float64) - b[i].numpy().astype(np.float64)) ** 2)
        assert abs(got[i].item() - 10 * math.log10(255**2 / mse)) < 1e-9
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (independent PSNR/SSIM)")
    for i in range(3):
        assert abs(got[i].item() - skm.peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=255)) < 1e-9
    assert psnr(a[0], a[0]).item() == math.inf


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (independent SSIM)")
    a, b = _frames(3, 37, 53, seed=1)
    got = ssim(a, b)
    for i in range(3):
        ref = skm.structural_similarity(a[i].numpy(), b[i].numpy(), data_range=255, channel_axis=-1,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(got[i].item() - ref) < 1e-9
    assert abs(ssim(a[0], a[0]).item() - 1.0) < 1e-12


def test_ssim_matches_a_direct_window_loop():
    """Brute force: every 11 x 11 window, Gaussian weights, per channel, averaged (no scikit-image needed)."""
    a, b = _frames(1, 13, 14, seed=2)
    x, y = a[0].double().numpy(), b[0].double().numpy()
    r = np.arange(-5, 6)
    g1 = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g1, g1) / np.outer(g1, g1).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(3):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                px, py = x[i:i + 11, j:j + 11, ch], y[i:i + 11, j:j + 11, ch]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
                cxy = (w * px * py).sum() - mx * my
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert abs(ssim(a[0], b[0]).item() - np.mean(vals)) < 1e-10


def test_scores_of_a_rollout_and_the_copy_last_frame_baseline():
    """Scores cover the predicted frames only; the last one is the challenge's frame; the baseline is x16."""
    true = torch.randint(0, 256, (25, 32, 32, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    pred = true.clone()
    pred[17:] = (true[17:].int() + 9).clamp(0, 255).to(torch.uint8)
    pred[:17] = 0  # context frames are not scored
    as_float = pred.permute(3, 0, 1, 2).float() / 127.5 - 1  # [3, T, H, W] in [-1, 1]
    groups = [as_float[:, :1], *as_float[:, 1:].split(4, dim=1)]
    scores, rows = score_clip(groups, true, 17)
    assert abs(scores["psnr_last"] - psnr(pred[24], true[24]).item()) < 1e-9
    assert abs(scores["psnr_mean"] - np.mean([psnr(pred[i], true[i]).item() for i in range(17, 25)])) < 1e-9
    assert abs(scores["ssim_mean"] - np.mean([ssim(pred[i], true[i]).item() for i in range(17, 25)])) < 1e-9
    assert abs(scores["baseline_psnr_last"] - psnr(true[16], true[24]).item()) < 1e-9
    assert abs(scores["baseline_ssim_mean"] - np.mean([ssim(true[16], true[i]).item() for i in range(17, 25)])) < 1e-9
    assert len(rows) == 2 and torch.equal(rows[0][0], true[16]) and torch.equal(rows[1][-1], pred[24])


@pytest.fixture(scope="module")
def world_release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("wm") / "world", state_dim=STATE_DIM, text=False)


def _clips(n):
    g = torch.Generator().manual_seed(1)
    return [{"video": torch.rand(3, 21, 32, 32, generator=g) * 2 - 1, "states": torch.randn(21, STATE_DIM, generator=g)}
            for _ in range(n)]


def test_rollouts_over_two_dp_replicas_equal_one_process(world_release):
    cfg = SamplingConfig(steps=2, guidance=1.0)
    clips = _clips(3)
    single = workers.rollouts_layout(world_release, 1, 1, clips, cfg)
    two = run_distributed(workers.rollouts_layout, 2, world_release, 1, 1, clips, cfg)
    assert single["num_clips"] == 3 and all(r["num_clips"] == 3 for r in two)
    for key in ("psnr_last", "psnr_mean", "ssim_mean", "baseline_psnr_last", "baseline_ssim_mean"):
        assert abs(two[0][key] - single[key]) < 1e-6 and two[0][key] == two[1][key], key
    assert torch.equal(two[1]["contact_sheet"], single["contact_sheet"])
    assert single["contact_sheet"].dtype == torch.uint8 and single["contact_sheet"].shape[0] == 3


def test_tensorboard_logging_pairs_model_and_baseline():
    from megawan.evaluation import log_to_tensorboard

    class Recorder:
        def __init__(self):
            self.scalars, self.images = {}, {}

        def add_scalars(self, tag, values, step):
            self.scalars[tag] = (values, step)

        def add_image(self, tag, img, step):
            self.images[tag] = (img, step)

    result = {m: float(i) for i, m in enumerate(("psnr_last", "psnr_mean", "ssim_last", "ssim_mean"))}
    result.update({"baseline_" + m: v + 10 for m, v in list(result.items())})
    result["contact_sheet"] = torch.zeros(3, 4, 8, dtype=torch.uint8)
    w = Recorder()
    log_to_tensorboard(w, result, 500)
    assert w.scalars["eval/psnr_last"] == ({"model": 0.0, "copy_last_frame": 10.0}, 500)
    assert w.scalars["eval/ssim_mean"] == ({"model": 3.0, "copy_last_frame": 13.0}, 500)
    assert w.images["eval/rollout"][0].shape == (3, 4, 8)
