"""Finding, reading and writing Wan 2.2 VAE checkpoint files (official .pth, diffusers folder)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from megawan.utils import atomic_path, save_safetensors

OFFICIAL_FILE = "Wan2.2_VAE.pth"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def locate_checkpoint(path: Path) -> tuple[Path, dict | None]:
    """The weights file under ``path`` and, for a diffusers folder, its parsed config.json."""
    if path.is_file():
        config = path.parent / "config.json" if path.suffix == ".safetensors" else None
        return path, (json.loads(config.read_text()) if config and config.is_file() else None)
    for folder in (path, path / "vae"):
        if (folder / DIFFUSERS_WEIGHTS).is_file():
            config = folder / "config.json"
            return folder / DIFFUSERS_WEIGHTS, (json.loads(config.read_text()) if config.is_file() else None)
    if (path / OFFICIAL_FILE).is_file():
        return path / OFFICIAL_FILE, None
    raise FileNotFoundError(f"no VAE checkpoint at {path}: expected a .pth/.safetensors file, a folder with "
                            f"{DIFFUSERS_WEIGHTS} (optionally under vae/), or a folder with {OFFICIAL_FILE}")


def read_state_dict(path: Path, weights_only: bool = True) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except RuntimeError:  # mmap needs the zip format; legacy files load without it
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def write_official(path: Path, state: dict) -> Path:
    if path.suffix != ".pth":
        path = path / OFFICIAL_FILE
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def write_diffusers(folder: Path, state: dict, config: dict) -> Path:
    """Weights, then config.json, each written atomically (the folder may hold other files)."""
    with atomic_path(folder / DIFFUSERS_WEIGHTS) as tmp:
        save_safetensors(state, tmp)
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder
