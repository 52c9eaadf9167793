"""VAE38 on one process: parity with diffusers' AutoencoderKLWan, checkpoint layouts, input validation."""

from __future__ import annotations

import re

import diffusers  # a test dependency (setup.py [test]): a missing one must fail, not skip
import pytest
import torch

from megawan.vae.model import LATENTS_MEAN, LATENTS_STD, WanVAE38, WanVAE38Config

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny diffusers VAE in the Wan 2.2 configuration, and ours loaded from its folder."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=16, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=list(LATENTS_MEAN), latents_std=list(LATENTS_STD)).eval()
    with torch.no_grad():  # diffusers initialises RMS-norm gammas to 1 and biases to 0: perturb every
        for p in ref.parameters():  # parameter, so a mis-mapped gamma or bias changes the output
            p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.01 * torch.randn_like(p))  # relative: no saturation
        gammas = [n for n, p in ref.named_parameters() if n.endswith("gamma")]
        assert len(gammas) == 52 and all((ref.get_parameter(n) != 1).all() for n in gammas)
    folder = tmp_path_factory.mktemp("vae_diffusers")
    ref.save_pretrained(folder)
    return ref, WanVAE38.from_pretrained(folder), folder


def _stats():
    return torch.tensor(LATENTS_MEAN).view(1, 48, 1, 1, 1), torch.tensor(LATENTS_STD).view(1, 48, 1, 1, 1)


@pytest.mark.parametrize("frames", [1, 9, 17])
def test_matches_diffusers(reference, frames):
    ref, ours, _ = reference
    assert ours.config == WanVAE38Config.tiny()
    torch.manual_seed(frames)
    video = torch.rand(1, 3, frames, 64, 48) * 2 - 1  # H != W catches transposed patchify/tiles
    mean, std = _stats()
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
        video_ref = ref.decode(mu).sample
    latents = ours.encode(video)
    assert latents.shape == (1, 48, (frames - 1) // 4 + 1, 4, 3)
    assert rel_err(latents, (mu - mean) / std) <= TOL
    decoded = ours.decode((mu - mean) / std)
    assert decoded.shape == video.shape
    assert (decoded.abs() < 1).float().mean() > 0.9, "outputs saturated by the clamp: comparison too weak"
    assert rel_err(decoded, video_ref) <= TOL
    print(f"T={frames}: encode rel err {rel_err(latents, (mu - mean) / std):.2e}, "
          f"decode rel err {rel_err(decoded, video_ref):.2e}")


def test_official_and_diffusers_layouts_load_identically(reference, tmp_path):
    _, ours, folder = reference
    official = ours.save_pretrained(tmp_path / "Wan2.2_VAE.pth", layout="official")
    state = torch.load(official, weights_only=True)
    assert "encoder.conv1.weight" in state and "decoder.upsamples.0.upsamples.3.time_conv.weight" in state
    assert "encoder.downsamples.1.downsamples.0.shortcut.weight" in state and "decoder.head.2.bias" in state
    from_official = WanVAE38.from_pretrained(official)
    from_diffusers = WanVAE38.from_pretrained(folder)
    assert from_official.config == from_diffusers.config
    torch.manual_seed(1)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    a, b = from_official.encode(video), from_diffusers.encode(video)
    assert torch.equal(a, b)
    assert torch.equal(from_official.decode(a), from_diffusers.decode(b))


def test_released_size_and_key_counts():
    with torch.device("meta"):
        vae = WanVAE38()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(vae), count(vae.encoder), count(vae.decoder)) == (704_688_668, 149_627_776, 555_049_228)


def test_frame_groups_and_streaming_match(reference):
    _, ours, _ = reference
    torch.manual_seed(2)
    latents = torch.randn(1, 48, 4, 2, 3)
    whole = ours.decode(latents)
    grouped = ours.decode(latents, frames_per_step=2)
    assert rel_err(grouped, whole) <= TOL
    pieces = list(ours.iter_decode(latents))
    assert [p.shape[2] for p in pieces] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(pieces, dim=2), whole)


def test_output_channel_groups_change_nothing(reference, monkeypatch):
    """Large weights run in groups of output channels on CPU (bounding oneDNN's weight-reorder temporary);
    forcing 16-channel groups on the tiny VAE must give the same encode and decode. Each output channel
    is computed from the same inputs and weights either way; oneDNN may still pick another kernel for
    another channel count on some CPUs, so the bound is float rounding (1e-6), not bit equality."""
    import torch.nn.functional as F

    from megawan.vae import conv as vae_conv

    _, ours, _ = reference
    torch.manual_seed(3)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    latents = torch.randn(1, 48, 3, 2, 3)
    whole = ours.encode(video), ours.decode(latents)
    x, w, b = torch.randn(1, 24, 3, 6, 7), torch.randn(40, 24, 3, 3, 3), torch.randn(40)
    monkeypatch.setattr(vae_conv, "WEIGHT_GROUP_BYTES", 1)  # -> 16 channels a group, 40 = 16 + 16 + 8
    assert rel_err(vae_conv.conv_by_output_groups(F.conv3d, x, w, b), F.conv3d(x, w, b)) <= 1e-6
    grouped = ours.encode(video), ours.decode(latents)
    assert rel_err(grouped[0], whole[0]) <= 1e-6 and rel_err(grouped[1], whole[1]) <= 1e-6


def test_bad_inputs_are_refused(reference):
    _, ours, _ = reference
    with pytest.raises(ValueError, match="channels"):
        ours.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match="4n"):
        ours.encode(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(torch.zeros(1, 3, 5, 40, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        ours.encode(torch.zeros(3, 5, 32, 32))
    with pytest.raises(ValueError, match="expects 48"):
        ours.decode(torch.zeros(1, 16, 2, 2, 2))


def test_bad_checkpoints_name_the_key(reference, tmp_path):
    _, ours, _ = reference
    official = ours.save_pretrained(tmp_path / "Wan2.2_VAE.pth", layout="official")
    state = torch.load(official, weights_only=True)
    del state["decoder.middle.1.to_qkv.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match="decoder.middle.1.to_qkv.weight"):
        WanVAE38.from_pretrained(tmp_path / "missing.pth")
    state = torch.load(official, weights_only=True)
    state["encoder.head.2.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="encoder.head.2.bias"):
        WanVAE38.from_pretrained(tmp_path / "shape.pth")
    with pytest.raises(FileNotFoundError):
        WanVAE38.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("change, message", [
    ({"is_residual": False}, "is_residual=False; VAE38 needs True"),  # the Wan 2.1 VAE
    ({"patch_size": None}, "patch_size=None; VAE38 needs 2"),
    ({"in_channels": 3, "out_channels": 3}, "in_channels=3; VAE38 needs 12"),
    ({"attn_scales": [1.0]}, "attn_scales is not VAE38"),
    ({"temperal_downsample": [True, True, False]}, "temporal_downsample (False, True, True)"),
    ({"z_dim": 16}, "z_dim=16"),
])
def test_non_vae38_configs_are_refused(reference, tmp_path, change, message):
    import json
    import shutil

    _, _, folder = reference
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=re.escape(message)):
        WanVAE38.from_pretrained(bad)


def _released_official_keys() -> set[str]:
    """Every tensor name of Wan2.2_VAE.pth, written out from the release's module structure (not from megawan's
    rename table): per residual block residual.{0.gamma, 2.*, 3.gamma, 6.*} plus shortcut.* where the width
    changes; encoder stages of 2 blocks (widths 160 -> 160, 320, 640, 640) with a resample at index 2 for the
    first three (time_conv in the two 3-D ones); decoder stages of 3 blocks (1024 -> 1024, 1024, 512, 256) with
    a resample at index 3 for the first three (time_conv in the two 3-D ones); middle = block, attention,
    block; head = RMS norm, SiLU, conv; conv1 / conv2 = the 1x1x1 quant / post-quant convs."""
    wb = ("weight", "bias")

    def block(prefix, shortcut):
        keys = {f"{prefix}.residual.0.gamma", f"{prefix}.residual.3.gamma"}
        keys |= {f"{prefix}.residual.{i}.{w}" for i in (2, 6) for w in wb}
        return keys | ({f"{prefix}.shortcut.{w}" for w in wb} if shortcut else set())

    keys = {f"{c}.{w}" for c in ("conv1", "conv2") for w in wb}
    for part, name, blocks, widths, resample_3d in (
            ("encoder", "downsamples", 2, (160, 160, 320, 640, 640), (False, True, True)),
            ("decoder", "upsamples", 3, (1024, 1024, 1024, 512, 256), (True, True, False))):
        keys |= {f"{part}.conv1.{w}" for w in wb} | {f"{part}.head.0.gamma"} | {f"{part}.head.2.{w}" for w in wb}
        keys |= block(f"{part}.middle.0", False) | block(f"{part}.middle.2", False)
        keys |= {f"{part}.middle.1.norm.gamma"} | {f"{part}.middle.1.{m}.{w}" for m in ("to_qkv", "proj") for w in wb}
        for i in range(4):
            for j in range(blocks):
                keys |= block(f"{part}.{name}.{i}.{name}.{j}", j == 0 and widths[i] != widths[i + 1])
            if i < 3:
                keys |= {f"{part}.{name}.{i}.{name}.{blocks}.resample.1.{w}" for w in wb}
                if resample_3d[i]:
                    keys |= {f"{part}.{name}.{i}.{name}.{blocks}.time_conv.{w}" for w in wb}
    return keys


def test_full_official_and_diffusers_key_lists():
    """Official names: the release's full list (above). diffusers names: diffusers' own AutoencoderKLWan at the
    released configuration, built on the meta device."""
    from megawan.checkpoint.vae_keys import to_external

    with torch.device("meta"):
        vae = WanVAE38()
        ref = diffusers.AutoencoderKLWan(
            base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
            patch_size=2, scale_factor_spatial=16, temperal_downsample=[False, True, True],
            latents_mean=list(LATENTS_MEAN), latents_std=list(LATENTS_STD))
    ours = vae.state_dict()
    official = set(to_external(ours, "official", vae.config.num_res_blocks))
    released = _released_official_keys()
    assert official == released, (sorted(official - released)[:5], sorted(released - official)[:5])
    assert sum(k.endswith("gamma") for k in official) == 52
    theirs = ref.state_dict()
    ours_diffusers = to_external(ours, "diffusers", vae.config.num_res_blocks)
    assert set(ours_diffusers) == set(theirs), (sorted(set(ours_diffusers) - set(theirs))[:5],
                                                sorted(set(theirs) - set(ours_diffusers))[:5])
    assert all(tuple(ours_diffusers[k].shape) == tuple(theirs[k].shape) for k in theirs)
