"""Tiny checkpoints in the release's official layout for the sampling and evaluation tests."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from megawan.models.dit import DiTRuntime, WanDiT
from megawan.vae.model import WanVAE38, WanVAE38Config
from tests.dit_fixtures import TINY

RT = DiTRuntime(linear_impl="local")
STATE_DIM = 25


def tiny_dit(state_dim: int = 0, seed: int = 0) -> WanDiT:
    """A tiny random DiT (state embedder randomised too, so states matter)."""
    torch.manual_seed(seed)
    model = WanDiT(dataclasses.replace(TINY, state_dim=state_dim), runtime=RT)
    with torch.no_grad():
        for p in model.parameters():  # larger than init so outputs depend visibly on every input
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_vae(seed: int = 0) -> WanVAE38:
    torch.manual_seed(seed)
    return WanVAE38(WanVAE38Config.tiny()).eval()


def write_release(root: Path, state_dim: int = 0, text: bool = True) -> Path:
    """A folder shaped like Wan-AI/Wan2.2-TI2V-5B: DiT, Wan2.2_VAE.pth, umT5 .pth + google/umt5-xxl tokenizer."""
    from megawan.data.text_encoder import UMT5TextEncoder, official_umt5_state_dict, save_tiny_umt5

    root = Path(root)
    tiny_dit(state_dim).save_pretrained(root, layout="official")
    tiny_vae().save_pretrained(root / "Wan2.2_VAE.pth", layout="official")
    if text:
        hf = save_tiny_umt5(root / "_hf_umt5", d_model=TINY.text_dim)
        enc = UMT5TextEncoder(hf, dtype=torch.float32)
        torch.save(official_umt5_state_dict(enc.model), root / "models_t5_umt5-xxl-enc-bf16.pth")
        tok = root / "google" / "umt5-xxl"
        tok.mkdir(parents=True)
        for f in hf.iterdir():
            if "token" in f.name or f.name == "special_tokens_map.json":
                shutil.copy(f, tok / f.name)
        shutil.rmtree(hf)
    return root


def write_diffusers_release(root: Path) -> Path:
    """The same tiny weights as ``write_release`` in the layout of Wan-AI/Wan2.2-TI2V-5B-Diffusers."""
    from megawan.data.text_encoder import save_tiny_umt5

    root = Path(root)
    tiny_dit().save_pretrained(root / "transformer", layout="diffusers")
    tiny_vae().save_pretrained(root / "vae", layout="diffusers")
    save_tiny_umt5(root / "text_encoder", d_model=TINY.text_dim)
    shutil.copytree(root / "text_encoder", root / "tokenizer")
    return root
