"""Atomic writes: a failed write leaves the previous file (or nothing) and no temporary behind."""

from __future__ import annotations

import pytest
import torch

from megawan.utils import atomic_path
from megawan.checkpoint.vae_io import write_diffusers, write_official


def test_failed_block_keeps_the_old_file(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]


def test_folder_replaces_an_empty_one(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("x")
    assert (target / "a").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("writer", ["official", "diffusers"])
def test_vae_writers_are_atomic(tmp_path, writer):
    good = {"w": torch.ones(2)}
    bad = {"w": torch.zeros(2), "x": lambda: 0}  # torch.save cannot pickle it, safetensors wants tensors
    write = (lambda s: write_official(tmp_path / "v.pth", s)) if writer == "official" else \
        (lambda s: write_diffusers(tmp_path, s, {"_class_name": "AutoencoderKLWan"}))
    path = write(good)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(Exception):
        write(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary left
    weights = path if writer == "official" else path / "diffusion_pytorch_model.safetensors"
    if writer == "official":
        assert torch.equal(torch.load(weights, weights_only=True)["w"], good["w"])
    else:
        from safetensors.torch import load_file

        assert torch.equal(load_file(str(weights))["w"], good["w"])
