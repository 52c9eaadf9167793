"""Latent cache: cached latents equal a direct VAE encode, text embeddings padded like Wan, resumable
precompute that skips finished shards, and a 2-rank spatially sharded run equal to one process."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megawan.data import CaptionedFolderConfig, CaptionedVideoFolder, WorldModel1XConfig, WorldModel1XDataset
from megawan.data.latent_cache import LatentCacheDataset, shard_name
from megawan.data.text_encoder import UMT5TextEncoder, save_tiny_umt5
from megawan.vae.model import WanVAE38, WanVAE38Config
from megawan.testing import run_distributed
from megawan.tools.make_sample_data import make_sample_data
from megawan.tools.precompute import main as precompute_main
from megawan.tools.precompute import precompute

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    make_sample_data(root / "data", train_shards=2, val_shards=0, frames_per_shard=60, size=32, gop=8,
                     min_segment=20, max_segment=40, captioned_videos=3, workers=2)
    torch.manual_seed(0)
    vae = WanVAE38(WanVAE38Config.tiny()).eval()
    vae.save_pretrained(root / "vae")
    save_tiny_umt5(root / "umt5")
    return root, vae, UMT5TextEncoder(root / "umt5", dtype=torch.float32)


def world_model_source(root):
    return WorldModel1XDataset(WorldModel1XConfig(str(root / "data" / "train_v2.0_raw"), clip_frames=5,
                                                  window_hop=8))


def test_cache_round_trip_equals_direct_encode(assets, tmp_path):
    root, vae, text = assets
    source = world_model_source(root)
    index = precompute(source, tmp_path / "c", vae=vae, text_encoder=text, samples_per_shard=4, max_samples=10,
                       progress=False)
    assert index["num_samples"] == 10 and [s["num_samples"] for s in index["shards"]] == [4, 4, 2]
    cache = LatentCacheDataset(tmp_path / "c")
    empty = text.encode([""])[0]
    for i in range(10):
        sample, clip = cache[i], source[i]
        direct = vae.encode(clip["video"][None])[0]
        assert sample["latents"].shape == (48, 2, 2, 2)
        assert torch.equal(sample["latents"], direct)
        assert torch.equal(sample["states"], clip["states"])
        assert (sample["shard"], sample["first_frame"]) == (clip["shard"], clip["first_frame"])
        assert sample["text_embeds"].shape == (512, 32) and sample["text_length"] == empty.shape[0]
        assert torch.equal(sample["text_embeds"][: empty.shape[0]], empty)
        assert not sample["text_embeds"][empty.shape[0]:].any()


def test_rerun_skips_finished_shards_and_refuses_other_settings(assets, tmp_path):
    root, vae, text = assets
    source = world_model_source(root)
    out = tmp_path / "c"
    precompute(source, out, vae=vae, text_encoder=text, samples_per_shard=4, max_samples=12, progress=False)
    kept = (out / shard_name(0)).stat().st_mtime_ns
    before = LatentCacheDataset(out)[5]["latents"]
    (out / shard_name(1)).unlink()
    (out / "index.json").unlink()
    precompute(source, out, vae=vae, text_encoder=text, samples_per_shard=4, max_samples=12, progress=False)
    assert (out / shard_name(0)).stat().st_mtime_ns == kept  # not rewritten
    assert torch.equal(LatentCacheDataset(out)[5]["latents"], before)  # shard 1 redone, same values
    assert not list(out.glob("shards/.*tmp*"))  # no partial files left
    with pytest.raises(ValueError, match="samples_per_shard"):
        precompute(source, out, vae=vae, text_encoder=text, samples_per_shard=3, max_samples=12, progress=False)


def test_captioned_folder_cache_keeps_each_prompt(assets, tmp_path):
    root, vae, text = assets
    source = CaptionedVideoFolder(CaptionedFolderConfig(str(root / "data" / "captioned"), size=(32, 48),
                                                        clip_frames=5))
    precompute(source, tmp_path / "c", vae=vae, text_encoder=text, samples_per_shard=2, progress=False)
    cache = LatentCacheDataset(tmp_path / "c")
    assert len(cache) == 3 and json.loads((tmp_path / "c" / "index.json").read_text())["text"] == "per_sample"
    for i in range(3):
        sample = cache[i]
        expected = text.encode([source.items[i][1]])[0]
        assert sample["caption"] == source.items[i][1] and sample["text_length"] == expected.shape[0]
        assert torch.allclose(sample["text_embeds"][: expected.shape[0]], expected, atol=1e-5)
        assert not sample["text_embeds"][expected.shape[0]:].any()
        assert torch.equal(sample["latents"], vae.encode(source[i]["video"][None])[0])


def _run_cli(argv):
    precompute_main(argv)


def _cli_args(root):
    return ["--source", "1x", "--data", str(root / "data" / "train_v2.0_raw"), "--vae", str(root / "vae"),
            "--text-encoder", str(root / "umt5"), "--clip-frames", "5", "--window-hop", "8",
            "--samples-per-shard", "3", "--max-samples", "7"]


def test_two_vae_groups_of_two_ranks_match_one_process(assets, tmp_path):
    """4 ranks, --vae-shards 2: two encode groups, each sharding the VAE over 2 ranks; 7 samples in 3 cache
    shards, so group 0 writes shards 0 and 2 and group 1 shard 1. Every sample must equal one process's."""
    root, vae, text = assets
    argv = _cli_args(root) + ["--dtype", "float32", "--out", str(tmp_path / "sharded"), "--vae-shards", "2"]
    run_distributed(_run_cli, 4, argv, timeout_s=300)
    precompute(world_model_source(root), tmp_path / "single", vae=vae, text_encoder=text, samples_per_shard=3,
               max_samples=7, progress=False)
    sharded, single = LatentCacheDataset(tmp_path / "sharded"), LatentCacheDataset(tmp_path / "single")
    index = json.loads((tmp_path / "sharded" / "index.json").read_text())
    assert len(index["shards"]) == 3
    assert len(sharded) == len(single) == 7
    for i in range(7):
        assert torch.allclose(sharded[i]["latents"], single[i]["latents"], atol=1e-5, rtol=1e-5), i
        assert sharded[i]["first_frame"] == single[i]["first_frame"]


def test_two_vae_groups_split_the_shards_and_store_bf16_by_default(assets, tmp_path):
    """--vae-shards 1 on 2 ranks: two encode groups, shard k written by group k mod 2; no --dtype: bf16."""
    root, vae, text = assets
    run_distributed(_run_cli, 2, ["--source", "1x", "--data", str(root / "data" / "train_v2.0_raw"),
                                  "--vae", str(root / "vae"), "--text-encoder", str(root / "umt5"),
                                  "--clip-frames", "5", "--window-hop", "8", "--samples-per-shard", "2",
                                  "--max-samples", "7", "--out", str(tmp_path / "groups")], timeout_s=300)
    assert json.loads((tmp_path / "groups" / "cache_config.json").read_text())["dtype"] == "bfloat16"
    cache, source = LatentCacheDataset(tmp_path / "groups"), world_model_source(root)
    assert len(cache) == 7 and len(json.loads((tmp_path / "groups" / "index.json").read_text())["shards"]) == 4
    for i in range(7):  # every clip once, in dataset order, whichever group wrote its shard
        sample, clip = cache[i], source[i]
        assert sample["latents"].dtype == torch.bfloat16
        assert (sample["shard"], sample["first_frame"]) == (clip["shard"], clip["first_frame"])
        direct = vae.encode(clip["video"][None])[0]
        # bf16 compute and storage: a few bf16 roundings (2^-8 relative) through the tiny VAE
        assert torch.allclose(sample["latents"].float(), direct, rtol=0.05, atol=0.05 * direct.abs().max())



@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_cache_files_get_the_umasks_mode(assets, tmp_path, mask):
    """Shards and the empty-prompt embedding get the mode the umask gives every other file (0644 under umask
    022), not safetensors' 0600: a cache is shared by the users of a cluster."""
    root, vae, text = assets
    old = os.umask(mask)
    try:
        precompute(world_model_source(root), tmp_path / "c", vae=vae, text_encoder=text, samples_per_shard=2,
                   max_samples=3, progress=False)
    finally:
        os.umask(old)
    files = sorted(p for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"empty_prompt.safetensors", "shard_00000.safetensors",
                                       "shard_00001.safetensors", "index.json", "cache_config.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~mask) for p in files}


# Third-party notices a precompute rank used to print (each once per rank): megatron-core's pure-torch
# fallbacks, torchao's optional kernels and Triton, torch's pytree deprecation of torchao's enums, and
# transformers' weight-loading bar.
THIRD_PARTY = ("Transformer Engine and Apex are not installed", "torchao", "Detected no triton",
               "is an Enum subclass", "Loading weights: 100%")


def _normalised(line: str) -> str:
    """A stderr line without what differs between ranks: torch's "[rankN]:" prefix and glog-style header."""
    line = re.sub(r"^\[rank\d+\]:", "", line)
    return re.sub(r"^[WEI]\d{4} [\d:.]+ \d+ ", "", line)


def test_a_two_rank_precompute_prints_no_notice_twice(assets, tmp_path):
    """torchrun, 2 ranks: each third-party notice at most once in stderr, and no stderr line twice (one rank
    would otherwise repeat every notice the other prints)."""
    root, _, _ = assets
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "megawan.tools.precompute", *_cli_args(root), "--dtype", "float32",
                          "--out", str(tmp_path / "c")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "7 samples in 3 shards" in run.stdout
    lines = [_normalised(line) for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    for notice in THIRD_PARTY:
        assert sum(notice in line for line in lines) <= 1, (notice, run.stderr)
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, run.stderr
