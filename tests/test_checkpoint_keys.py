"""The VAE's name tables (one style with the DiT's): held against diffusers' own names and the release's."""

from __future__ import annotations

import re

import diffusers  # a test dependency (setup.py [test]): a missing one must fail, not skip
import pytest
import torch

from megawan.checkpoint.renames import rename
from megawan.checkpoint.vae_keys import external_name
from megawan.vae import WanVAE38, WanVAE38Config

# The release's VAE key patterns (Wan2.2_VAE.pth), as listed in the model reference.
_RES = r"residual\.(0\.gamma|2\.weight|2\.bias|3\.gamma|6\.weight|6\.bias)|shortcut\.(weight|bias)"
_OFFICIAL = re.compile(
    rf"conv[12]\.(weight|bias)"
    rf"|(encoder|decoder)\.conv1\.(weight|bias)"
    rf"|encoder\.downsamples\.\d\.downsamples\.\d\.({_RES}|resample\.1\.(weight|bias)|time_conv\.(weight|bias))"
    rf"|decoder\.upsamples\.\d\.upsamples\.\d\.({_RES}|resample\.1\.(weight|bias)|time_conv\.(weight|bias))"
    rf"|(encoder|decoder)\.middle\.[02]\.({_RES})"
    rf"|(encoder|decoder)\.middle\.1\.(norm\.gamma|to_qkv\.(weight|bias)|proj\.(weight|bias))"
    rf"|(encoder|decoder)\.head\.(0\.gamma|2\.(weight|bias))")


def _megawan_names(config: WanVAE38Config) -> list[str]:
    with torch.device("meta"):
        return list(WanVAE38(config).state_dict())


def test_rename_table_rules():
    table = [("a.b.", "x."), ("a.", "y."), ("exact", "z")]
    assert rename("a.b.w", table) == "x.w"            # the first (more specific) row wins
    assert rename("a.c", table) == "y.c"
    assert rename("exactly", table) is None            # no "." at the end: exact names only
    assert rename("y.c", table, src=1) == "a.c"        # read backwards


def test_diffusers_names_are_diffusers_own():
    config = WanVAE38Config.preset("tiny")
    ref = diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=16, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, temperal_downsample=[False, True, True])
    ours = [external_name(k, "diffusers", config.num_res_blocks) for k in _megawan_names(config)]
    assert sorted(ours) == sorted(ref.state_dict())


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_official_names_follow_the_release(num_res_blocks):
    config = WanVAE38Config(base_dim=8, decoder_base_dim=16, num_res_blocks=num_res_blocks)
    names = _megawan_names(config)
    ours = [external_name(k, "official", num_res_blocks) for k in names]
    assert len(set(ours)) == len(names)  # one-to-one
    assert [n for n in ours if not _OFFICIAL.fullmatch(n)] == []
    # The resample follows the stage's residual blocks (the decoder has one more).
    assert f"encoder.downsamples.0.downsamples.{num_res_blocks}.resample.1.weight" in ours
    assert f"decoder.upsamples.0.upsamples.{num_res_blocks + 1}.time_conv.weight" in ours
    with pytest.raises(KeyError, match="no official name for VAE parameter encoder.nope"):
        external_name("encoder.nope.weight", "official", num_res_blocks)
