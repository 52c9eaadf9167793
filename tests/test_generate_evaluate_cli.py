"""python -m megawan.generate / megawan.evaluate end to end on tiny checkpoints in the release layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megawan import generate, evaluate
from tests.sampling_fixtures import STATE_DIM, write_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("rel") / "Wan2.2-TI2V-5B")


@pytest.fixture()
def image(tmp_path):
    from PIL import Image

    arr = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "first.png")
    return tmp_path / "first.png"


def _no_models(monkeypatch):
    """Fail loudly if a bad request gets as far as building a model."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the request was checked")
    monkeypatch.setattr(generate.WanDiT, "from_pretrained", refuse)
    monkeypatch.setattr(generate.parallel_state, "initialize", refuse)


def test_generate_writes_an_mp4_that_decodes_to_the_expected_frames(release, image, tmp_path):
    import av

    out = tmp_path / "out" / "video.mp4"
    infos = generate.main(["--ckpt", str(release), "--prompt", "robot picks up the cup", "--image", str(image),
                           "--frames", "13", "--steps", "2", "--seed", "7", "--dtype", "fp32", "--out", str(out)])
    assert infos[0]["frames"] == 13
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 13 and frames[0].shape == (64, 96, 3)
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["seed"] == 7 and settings["sampling"]["steps"] == 2 and settings["mode"] == "ti2v"
    assert settings["prompt"] == "robot picks up the cup" and settings["guidance_applied"]
    from PIL import Image

    sheet = np.array(Image.open(out.with_suffix(".png")))
    assert sheet.shape[0] == 64 and sheet.shape[1] > 96 * 4  # a row of frames


def test_generate_refuses_bad_inputs_before_loading_models(release, image, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    base = ["--ckpt", str(release), "--out", str(tmp_path / "x.mp4")]
    with pytest.raises(FileNotFoundError, match="no DiT checkpoint in"):
        generate.main(["--ckpt", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="VAE checkpoint not found"):
        generate.main(base + ["--vae", str(tmp_path / "missing.pth"), "--image", str(image)])
    from PIL import Image

    Image.fromarray(np.zeros((50, 96, 3), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match=r"input is 50x96 \(HxW\); height and width must be multiples of 32"):
        generate.main(base + ["--image", str(tmp_path / "odd.png")])
    np.save(tmp_path / "states.npy", np.zeros((20, STATE_DIM), np.float32))
    with pytest.raises(ValueError, match="states were given but the model has no state conditioning"):
        generate.main(base + ["--image", str(image), "--frames", "9", "--states", str(tmp_path / "states.npy")])
    with pytest.raises(ValueError, match=r"states must be \[frames, state_dim\] = \[21, 25\]"):
        generate.main(base + ["--state-dim", "25", "--image", str(image), "--frames", "21",
                              "--states", str(tmp_path / "states.npy")])


def test_generate_refuses_a_short_context_clip(release, tmp_path, monkeypatch):
    from megawan.tools.make_sample_data import write_video

    write_video(tmp_path / "ctx.mp4", [np.zeros((32, 32, 3), np.uint8)] * 12)
    _no_models(monkeypatch)
    with pytest.raises(ValueError, match="context clip has 12 frames; at least 17 are needed"):
        generate.main(["--ckpt", str(release), "--context", str(tmp_path / "ctx.mp4"), "--frames", "25"])


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    from megawan.tools import make_sample_data

    out = tmp_path_factory.mktemp("data")
    make_sample_data.main(["--out", str(out), "--train-shards", "1", "--val-shards", "1", "--frames-per-shard", "120",
                           "--size", "64", "--min-segment", "40", "--max-segment", "60", "--captioned-videos", "1",
                           "--workers", "1"])
    return out / "val_v2.0_raw"


def test_evaluate_on_the_sample_data(tmp_path, sample_data, capsys):
    from safetensors.torch import save_file

    wm = write_release(tmp_path / "wm", state_dim=STATE_DIM, text=False)
    out = tmp_path / "eval.json"
    emb = torch.zeros(512, 64)
    emb[:1] = 0.5  # an "empty prompt": one token, padded as the latent cache stores it
    save_file({"text_embeds": emb}, str(tmp_path / "empty_prompt.safetensors"))
    assert evaluate.load_text_embedding(tmp_path / "empty_prompt.safetensors", 64).shape == (1, 64)
    res = evaluate.main(["--ckpt", str(wm), "--data", str(sample_data), "--num-clips", "2", "--frames", "25",
                         "--steps", "2", "--dtype", "fp32", "--out", str(out),
                         "--text-embedding", str(tmp_path / "empty_prompt.safetensors")])
    saved = json.loads(out.read_text())
    assert saved["num_clips"] == 2 and len(saved["per_clip"]) == 2
    for key in ("psnr_last", "psnr_mean", "ssim_mean", "baseline_psnr_last", "baseline_ssim_mean"):
        assert saved[key] == pytest.approx(np.mean([c[key] for c in saved["per_clip"]]))
    assert out.with_suffix(".png").is_file()
    table = capsys.readouterr().out
    assert "| psnr_last |" in table and "copy-last-frame" in table
    assert res["settings"]["frames"] == 25


def test_both_release_layouts_give_the_same_video(release, image, tmp_path):
    """The official folder and the diffusers folder of the same weights sample the same video for a seed
    (compared on the lossless contact sheet, which holds every frame of this 5-frame video)."""
    from PIL import Image

    from tests.sampling_fixtures import write_diffusers_release

    diff = write_diffusers_release(tmp_path / "Wan2.2-TI2V-5B-Diffusers")
    sheets = []
    for root in (release, diff):
        out = tmp_path / root.name / "v.mp4"
        generate.main(["--ckpt", str(root), "--prompt", "a red disc", "--image", str(image), "--frames", "5",
                       "--steps", "2", "--dtype", "fp32", "--out", str(out)])
        sheets.append(np.array(Image.open(out.with_suffix(".png"))))
    assert sheets[0].shape == (64, 5 * 96 + 4 * 4, 3) and np.array_equal(sheets[0], sheets[1])


def test_a_bare_model_name_says_where_weights_come_from():
    from megawan.models.dit_config import WanDiTConfig

    with pytest.raises(FileNotFoundError, match="transformer/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers"):
        WanDiTConfig.load("Wan2.2-TI2V-5B")


def test_generate_a_world_model_rollout_from_a_1x_clip(tmp_path, sample_data):
    wm = write_release(tmp_path / "wm", state_dim=STATE_DIM, text=False)
    out = tmp_path / "rollout.mp4"
    info = generate.main(["--ckpt", str(wm), "--no-text", "--data", str(sample_data), "--clip", "1", "--frames", "25",
                          "--guidance", "1", "--steps", "2", "--dtype", "fp32", "--out", str(out)])[0]
    assert info["mode"] == "world_model" and info["frames"] == 25 and info["height"] == 64
    assert json.loads(out.with_suffix(".json").read_text())["inputs"]["clip"] == 1
