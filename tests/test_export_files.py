"""Exports where users take them: the files get the umask's mode (not safetensors' 0600), diffusers'
``from_pretrained`` loads a diffusers-layout export as a user installs it (diffusers + accelerate, the test
extra), and the export says what diffusers drops (a world model's state weights).

The folders are written by ``WanDiT.save_pretrained`` / ``WanVAE38.save_pretrained``, the writers
``python -m megawan.tools.export`` calls (tests/test_export.py runs the whole export from a training run)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file

from megawan.tools.export import export_notes
from tests.sampling_fixtures import STATE_DIM, tiny_dit, tiny_vae


@pytest.fixture
def umask():
    """``umask(mask)`` for the rest of the test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_exported_safetensors_get_the_umasks_mode(tmp_path, umask, mask):
    umask(mask)
    dit = tiny_dit()
    dit.save_pretrained(tmp_path / "official", layout="official")
    dit.save_pretrained(tmp_path / "diffusers", layout="diffusers")
    tiny_vae().save_pretrained(tmp_path / "diffusers" / "vae", layout="diffusers")
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    assert {f.relative_to(tmp_path).as_posix(): oct(f.stat().st_mode & 0o777) for f in files} == \
        {f.relative_to(tmp_path).as_posix(): oct(0o666 & ~mask) for f in files}


def test_diffusers_from_pretrained_loads_a_world_model_export_and_drops_only_the_states(tmp_path):
    from diffusers import WanTransformer3DModel

    dit = tiny_dit(state_dim=STATE_DIM)
    dit.save_pretrained(tmp_path, layout="diffusers")
    model, info = WanTransformer3DModel.from_pretrained(tmp_path, output_loading_info=True)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert info["missing_keys"] == [] and info["mismatched_keys"] == []
    assert sorted(info["unexpected_keys"]) == sorted(k for k in saved if k.startswith("condition_embedder.state_"))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)  # every weight as exported, none initialised


def test_the_export_notes_name_accelerate_and_the_dropped_state_weights():
    cfg = tiny_dit().config
    world = dataclasses.replace(cfg, state_dim=STATE_DIM)
    assert export_notes(cfg, "official") == []
    diffusers_note, states_note = export_notes(world, "diffusers")
    assert "from_pretrained(OUT) needs the accelerate package" in diffusers_note
    assert f"world model (state_dim {STATE_DIM})" in states_note and "drop its state-embedding weights" in states_note
    assert len(export_notes(world, "official")) == 1
