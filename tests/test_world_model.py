"""Issue 21: the world model on the sample data: the fitted tiny VAE, the run folder that samples by itself,
rollouts under other states, latent-space scores, the pictures, and the in-memory latent memo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tests._world_model_workers as w
from megawan.evaluation.rollouts import condition_states, latent_scores, sheet_frames
from megawan.testing.distributed import run_distributed
from megawan.tools.make_sample_data import make_sample_data
from tests._train_workers import with_dotted


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("wm_data") / "sample_1x"
    make_sample_data(root, captioned_videos=0)
    return root


def _overrides(root, out_dir, **extra):
    tree = {"run": {"out_dir": str(out_dir), "steps": 2},
            "data": {"root": str(root / "train_v2.0_raw"), "clip_frames": 9, "size": [64, 64], "batch_size": 2,
                     "vae": "tiny"},
            "objective": {"clean_frames": 2}, "optim": {"warmup_steps": 0},
            "parallel": {"tp": 1, "cp": 1},
            "checkpoint": {"every": 0, "keep": 2},
            "validation": {"every": 0, "root": str(root / "val_v2.0_raw"), "rollout_every": 0},
            "logging": {"progress_bar": False, "tensorboard": False, "every": 100}}
    return with_dotted(tree, extra)


# ---- states conditions and latent scores ------------------------------------------------------------
def test_states_conditions():
    s = torch.arange(12.0).view(6, 2)
    other = -s
    assert torch.equal(condition_states(s, "true"), s)
    assert torch.equal(condition_states(s, "zeroed"), torch.zeros(6, 2))
    assert torch.equal(condition_states(s, "swapped", other=other), other)
    late = condition_states(s, "shifted", shift_frames=1)  # frame t gets frame t-1's state (frame 0 its own)
    assert torch.equal(late[1:], s[:-1]) and torch.equal(late[0], s[0])
    with pytest.raises(ValueError, match="another clip"):
        condition_states(s, "swapped")
    with pytest.raises(ValueError, match="unknown states condition"):
        condition_states(s, "mirrored")


def test_latent_scores_against_the_encoded_truth_and_copy_last_latent():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(1, 48, 6, 2, 2, generator=g)
    pred = true.clone()
    pred[:, :, 3:] += 0.5  # every predicted latent frame off by 0.5: MSE 0.25; the clean frames do not count
    pred[:, :, :3] = 99.0
    s = latent_scores(pred, true, clean=3)
    assert abs(s["latent_mse_mean"] - 0.25) < 1e-6 and abs(s["latent_mse_last"] - 0.25) < 1e-6
    base = (true[:, :, 2:3] - true[:, :, 3:]).square().mean(dim=(0, 1, 3, 4))
    assert abs(s["baseline_latent_mse_mean"] - base.mean().item()) < 1e-6
    assert abs(s["baseline_latent_mse_last"] - base[-1].item()) < 1e-6


def test_sheet_frames_and_labelled_sheet():
    from megawan.evaluation.pictures import rollout_sheet

    assert sheet_frames(33, 17) == [16, 20, 24, 28, 32]
    tiles = [[torch.full((64, 64, 3), 40 * i + j, dtype=torch.uint8) for j in range(5)] for i in range(3)]
    sheet = rollout_sheet(tiles, ["truth", "prediction", "copy last frame"], [f"frame {i}\n+0.1 s" for i in range(5)])
    assert sheet.dtype == torch.uint8 and sheet.shape[2] == 3
    assert sheet.shape[0] >= 3 * 192 and sheet.shape[1] >= 5 * 192  # 64 px tiles upscaled 3x
    # the tile of row 1, column 2 is there, upscaled by nearest neighbour (uniform value 40 + 2)
    assert (sheet == 42).all(dim=-1).sum().item() >= 192 * 192
    with pytest.raises(ValueError, match="labels"):
        rollout_sheet(tiles, ["truth"], ["a"] * 5)


def test_training_curves_png(tmp_path):
    from PIL import Image

    from megawan.evaluation.pictures import write_training_curves

    logs = tmp_path / "logs"
    logs.mkdir()
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 41)]
    rows += [{"kind": "validation", "step": 20, "loss": 0.2}, {"kind": "validation", "step": 40, "loss": 0.1}]
    rows += [{"kind": "rollout", "step": 40, "psnr_last": 25.0, "baseline_psnr_last": 20.0, "zeroed_psnr_last": 19.0,
              "latent_mse_mean": 0.1, "baseline_latent_mse_mean": 0.3}]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_training_curves(tmp_path, "test")
    assert path == str(tmp_path / "curves.png")
    img = np.asarray(Image.open(path))
    assert img.shape[0] > 600 and img.shape[1] == 900 and (img != 255).any()


# ---- the VAE ----------------------------------------------------------------------------------------
def test_vae_fit_improves_held_out_reconstruction():
    """A short real fit of the tiny VAE38 (reconstruction + KL, megawan.vae.fit) on rendered sample-world clips:
    held-out reconstruction PSNR rises over its random start by a stated margin (>= 2 dB)."""
    from megawan.tools.fit_vae import rendered_clips
    from megawan.vae import WanVAE38, WanVAE38Config
    from megawan.vae.fit import VAEFitConfig, fit

    torch.manual_seed(0)
    vae = WanVAE38(WanVAE38Config.preset("tiny"))
    held_out = list(rendered_clips(12345, 2, 5, 32))
    history = fit(vae, lambda step: rendered_clips(step, 2, 5, 32), held_out,
                  VAEFitConfig(steps=60, lr=3e-3, warmup_steps=5, eval_every=0), log=None)
    start, end = history[0]["held_out_psnr"], history[-1]["held_out_psnr"]
    assert end >= start + 2.0, history


def test_random_crops_are_aligned_windows_drawn_per_clip_from_the_seed():
    """random_crops: one window per clip, the same in all its frames, at offsets that are multiples of 16 px (the
    latent grid of the full frame), different clips different windows, the same seed the same windows."""
    from megawan.vae.fit import random_crops

    clips = torch.randn(16, 3, 5, 64, 80)
    crops = random_crops(clips, 32, torch.Generator().manual_seed(3))
    assert crops.shape == (16, 3, 5, 32, 32)
    windows = []
    for clip, crop in zip(clips, crops):
        found = [(r, c) for r in range(0, 33, 16) for c in range(0, 49, 16)
                 if torch.equal(clip[..., r:r + 32, c:c + 32], crop)]
        assert len(found) == 1, found
        windows += found
    assert len(set(windows)) > 3, windows  # 12 possible windows, drawn independently per clip
    assert torch.equal(random_crops(clips, 32, torch.Generator().manual_seed(3)), crops)
    assert not torch.equal(random_crops(clips, 32, torch.Generator().manual_seed(4)), crops)
    for bad in (24, 0, 96):
        with pytest.raises(ValueError, match="multiple of 16"):
            random_crops(clips, bad, torch.Generator())


def test_fit_vae_cli_crops_and_chains_its_stages(sample_root, tmp_path):
    """fit_vae --crop trains on windows and scores whole frames; a snapshot's fit.json and the final one carry
    the chain of stages of their --init folder (the commands that reproduce the weights)."""
    from megawan.tools.fit_vae import main
    from megawan.vae.pretrained import FIT_REPORT, packaged_vae

    common = ["--data", str(sample_root), "--size", "32", "--clip-frames", "5", "--held-out-frames", "5",
              "--held-out-clips", "1", "--stats-clips", "2", "--batch-size", "2", "--threads", "1"]
    first = main(common + ["--out", str(tmp_path / "a"), "--steps", "1", "--crop", "16"])
    assert first["fit"]["crop"] == 16 and len(first["stages"]) == 1 and "--crop 16" in first["stages"][0]
    second = main(common + ["--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--steps", "3",
                            "--eval-every", "2", "--snapshot", str(tmp_path / "snap")])
    snap = json.loads((tmp_path / "snap" / FIT_REPORT).read_text())
    assert snap["snapshot_step"] == 2 and snap["stages"][0] == first["stages"][0]
    assert "stopped after the step-2 snapshot" in snap["stages"][1]
    assert second["stages"][0] == first["stages"][0] and "--steps 3" in second["stages"][1]
    assert packaged_vae(tmp_path / "snap").config.latents_std != packaged_vae(tmp_path / "a").config.latents_std


def test_latent_normalisation_from_the_fitted_encoder():
    """After set_latent_normalisation, encode() gives per-channel zero-mean unit-std latents on those clips,
    and decode(encode(x)) is unchanged (the normalisation is undone exactly)."""
    from megawan.tools.fit_vae import rendered_clips
    from megawan.vae import WanVAE38, WanVAE38Config
    from megawan.vae.fit import reconstruction_psnr, set_latent_normalisation

    torch.manual_seed(0)
    vae = WanVAE38(WanVAE38Config.preset("tiny")).eval()
    clips = list(rendered_clips(7, 3, 5, 32))
    before = reconstruction_psnr(vae, clips)
    set_latent_normalisation(vae, clips)
    z = torch.cat([vae.encode(c[None]) for c in clips]).transpose(0, 1).flatten(1)
    assert z.mean(1).abs().max() < 1e-3 and (z.std(1) - 1).abs().max() < 1e-3
    assert abs(reconstruction_psnr(vae, clips) - before) < 1e-3


def test_the_shipped_tiny_vae_reconstructs_the_sample_world(sample_root):
    """data.vae tiny_sample (package data, megawan.tools.fit_vae): held-out reconstruction of the sample data's
    val split, far above the random tiny VAE's (the figure fit.json records)."""
    from megawan.tools.fit_vae import held_out_clips
    from megawan.vae.fit import reconstruction_psnr
    from megawan.vae.pretrained import FIT_REPORT, fitted_names, load_vae, vae_source

    assert "tiny_sample" in fitted_names()
    clips = held_out_clips(sample_root / "val_v2.0_raw", 33, 64, 4)
    fitted = reconstruction_psnr(load_vae("tiny_sample"), clips)
    random = reconstruction_psnr(load_vae("tiny"), clips)
    recorded = json.loads((vae_source("tiny_sample") / FIT_REPORT).read_text())["held_out_psnr_written"]
    assert fitted > random + 5.0, (fitted, random)
    assert fitted > recorded - 1.5, (fitted, recorded)  # 4 of the fit's 8 held-out clips


# ---- the run folder ---------------------------------------------------------------------------------
def test_memoised_latents_equal_fresh_encodes(sample_root, tmp_path):
    """data.memo_latents: a second epoch takes each window's latents from memory; they equal fresh encodes."""
    over = _overrides(sample_root, tmp_path / "run", **{"data.window_hop": 40})
    got = run_distributed(w.memo_latents, 1, over, 2)[0]
    fresh, memo = got[False], got[True]
    assert fresh["memo_size"] is None and 0 < memo["memo_size"] <= 2 * memo["per_epoch"]
    for a, b in zip(fresh["latents"], memo["latents"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    for a, b in zip(fresh["states"], memo["states"]):
        assert torch.equal(a, b)


def test_the_run_folder_alone_generates_and_evaluates(sample_root, tmp_path):
    """A finished run records its VAE (<run>/vae/); generate and evaluate take the run folder (or a step_N
    folder) and nothing else model-wise: the newest checkpoint, the VAE, the clip length and frame size."""
    from megawan import evaluate, generate
    from megawan.tools import export

    run = tmp_path / "run"
    run_distributed(w.train_run, 1, _overrides(sample_root, run))
    assert (run / "vae" / "config.json").is_file() and (run / "curves.png").is_file()
    val = str(sample_root / "val_v2.0_raw")
    infos = generate.main(["--ckpt", str(run), "--data", val, "--clip", "1", "--steps", "2",
                           "--out", str(tmp_path / "gen" / "rollout.mp4")])
    assert infos[0]["frames"] == 9 and infos[0]["height"] == 64 and (tmp_path / "gen" / "rollout.png").is_file()
    res = evaluate.main(["--ckpt", str(run / "checkpoints" / "step_00000002"), "--data", val, "--num-clips", "2",
                         "--steps", "2", "--out", str(tmp_path / "eval" / "eval.json")])
    assert res["num_clips"] == 2 and res["contact_sheet"] == str(tmp_path / "eval" / "eval.png")
    assert set(res["conditions"]) == {"true", "zeroed", "swapped"}
    for key in ("latent_mse_mean", "baseline_latent_mse_mean", "zeroed_psnr_last", "swapped_latent_mse_mean"):
        assert np.isfinite(res[key]), key
    with pytest.raises(ValueError, match="no EMA"):
        evaluate.main(["--ckpt", str(run), "--ema", "--data", val, "--out", str(tmp_path / "e2.json")])
    # the export writes the VAE beside the DiT, so the exported folder samples by itself too
    export.main([str(run / "checkpoints" / "step_00000002"), str(tmp_path / "export"), "--layout", "diffusers"])
    assert (tmp_path / "export" / "vae" / "config.json").is_file()
    infos = generate.main(["--ckpt", str(tmp_path / "export"), "--no-text", "--data", val, "--frames", "9",
                           "--context-frames", "5",
                           "--size", "64x64", "--steps", "2", "--dtype", "fp32",
                           "--out", str(tmp_path / "gen2" / "r.mp4")])
    assert infos[0]["frames"] == 9


def test_a_run_folder_without_checkpoints_is_refused(tmp_path):
    from megawan.pipelines.trained import find_trained

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_trained(tmp_path / "run")
    assert find_trained(tmp_path) is None  # not a run: the release / DiT-folder path takes over


# ---- learning ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_sample_root(tmp_path_factory):
    """The sample data launch/demo.sh makes: 24 training shards of 33-60-frame segments (~120 segments)."""
    root = tmp_path_factory.mktemp("wm_demo_data") / "sample_1x"
    make_sample_data(root, train_shards=24, min_segment=33, max_segment=60, captioned_videos=0)
    return root


@pytest.mark.xfail(run=False, strict=True, reason=(
    "issue 21 goal not reached within a test's time: single-process, batch 8, on the demo's 24-shard data, the "
    "tiny DiT's held-out rollout latent MSE (mean over the 4 predicted frames) is 0.232 after 400 steps (214 s) "
    "and 0.083 after 1000 steps (415 s) against 0.074 for copying the last latent; only the last frame beats "
    "copying at 1000 steps (0.106 vs 0.141), and states one frame late score the same as the true ones "
    "(0.108), all measured with the 21.44 dB VAE and not yet with the 24.05 dB one (docs/benchmarks.md, "
    "'World model')"))
def test_a_short_run_beats_copying_the_last_latent_and_late_states_make_it_worse(demo_sample_root, tmp_path):
    """The learning test: a short TP1 run of the tiny world model (the tiny_1x preset's recipe: fitted VAE, latent
    memo, window hop 4, shift 5, batch 8), then rollouts on held-out clips: its latent MSE beats the
    copy-last-latent baseline, and the states one frame late score worse than the true ones."""
    over = _overrides(demo_sample_root, tmp_path / "run", **{
        "run.steps": 1000, "data.clip_frames": 33, "data.batch_size": 8, "data.vae": "tiny_sample",
        "data.memo_latents": True, "data.window_hop": 4, "objective.clean_frames": 5, "objective.shift": 5.0,
        "optim.lr": 2e-3, "optim.warmup_steps": 20,
        "validation.rollout_every": 1000, "validation.rollout_clips": 8, "validation.rollout_steps": 10,
        "validation.rollout_conditions": ["true", "shifted"]})
    run_distributed(w.train_run, 1, over, timeout_s=1800)
    rollouts = [json.loads(line) for line in open(tmp_path / "run" / "logs" / "metrics.jsonl")
                if json.loads(line)["kind"] == "rollout"]
    r = rollouts[-1]
    assert r["latent_mse_mean"] < r["baseline_latent_mse_mean"], r
    assert r["shifted_latent_mse_mean"] > r["latent_mse_mean"], r
