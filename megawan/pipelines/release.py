"""Where the DiT, VAE and text encoder of a Wan 2.2 TI2V-5B checkpoint live, in either release layout.

Official (Wan-AI/Wan2.2-TI2V-5B)            diffusers (Wan-AI/Wan2.2-TI2V-5B-Diffusers)
  config.json + diffusion_pytorch_model*       transformer/  (config.json + safetensors)
  Wan2.2_VAE.pth                               vae/          (AutoencoderKLWan)
  models_t5_umt5-xxl-enc-bf16.pth              text_encoder/ (UMT5EncoderModel)
  google/umt5-xxl/  (tokenizer)                tokenizer/

A trained megawan checkpoint is a DiT folder (config.json + safetensors, either key layout); give the VAE and
the text encoder explicitly, or keep them beside it in one of the layouts above. Everything is checked up front,
so a missing file fails before any model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megawan import parallel_state

OFFICIAL_VAE = "Wan2.2_VAE.pth"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_TOKENIZER = Path("google") / "umt5-xxl"


@dataclass(frozen=True)
class CheckpointFiles:
    dit: Path
    vae: Path
    text_encoder: Path | None  # None: no text encoder (empty-text world model, or embeddings given)
    tokenizer: Path | None


def _dit_folder(root: Path) -> Path:
    for cand in (root, root / "transformer"):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    if not root.exists():
        raise FileNotFoundError(f"DiT folder {root} does not exist")
    from megawan.training import checkpointing

    if (root / checkpointing.MARKER).exists() or (root / "checkpoints").is_dir():
        raise FileNotFoundError(f"{root} is a training checkpoint / run folder, not a DiT folder: pass it as --ckpt "
                                f"(generate and evaluate read training checkpoints), or export it first with "
                                f"python -m megawan.tools.export")
    raise FileNotFoundError(
        f"no DiT checkpoint in {root}: expected config.json and *.safetensors there (official layout or a "
        f"trained megawan checkpoint) or in {root / 'transformer'} (diffusers layout)")


def locate(root=None, *, dit=None, vae=None, text_encoder=None, tokenizer=None,
           need_text: bool = True) -> CheckpointFiles:
    """Resolve the files; explicit paths win over what ``root`` holds. Raises FileNotFoundError naming the
    missing piece and the layouts it was looked for in."""
    root = Path(root) if root is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist (nothing is downloaded: pass the local "
                                f"folder of Wan-AI/Wan2.2-TI2V-5B or Wan-AI/Wan2.2-TI2V-5B-Diffusers)")
    if dit is None and root is None:
        raise ValueError("give a checkpoint folder (root) or the DiT folder")
    dit_path = _dit_folder(Path(dit) if dit is not None else root)

    def find(explicit, candidates, what):
        if explicit is not None:
            p = Path(explicit)
            if not p.exists():
                raise FileNotFoundError(f"{what} not found: {p}")
            return p
        for c in candidates:
            if c.exists():
                return c
        raise FileNotFoundError(f"no {what} found; looked for " + ", ".join(str(c) for c in candidates)
                                + f" (pass it explicitly)")

    bases = [b for b in (root, dit_path, dit_path.parent) if b is not None]
    vae_path = find(vae, [p for b in bases for p in (b / OFFICIAL_VAE, b / "vae" / "config.json")], "VAE checkpoint")
    if vae_path.name == "config.json":
        vae_path = vae_path.parent
    te = tok = None
    if need_text or text_encoder is not None:
        te = find(text_encoder, [p for b in bases for p in (b / OFFICIAL_T5, b / "text_encoder" / "config.json")],
                  "umT5 text encoder")
        if te.name == "config.json":
            te = te.parent
        default_tok = [te.parent / OFFICIAL_TOKENIZER] if te.suffix == ".pth" else [te.parent / "tokenizer", te]
        tok = find(tokenizer, default_tok, "umT5 tokenizer")
    return CheckpointFiles(dit_path, vae_path, te, tok)


def start_groups(tp: int, cp: int, num_heads: int, cp_impl: str = "ulysses", ulysses_size: int | None = None):
    """``parallel_state.initialize`` for the CLIs. A lone process (no torchrun / SLURM variables) gets a 1-rank
    group through an in-memory store, so it never binds the default rendezvous port."""
    launched = ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or "SLURM_PROCID" in os.environ
    if not launched and not dist.is_initialized():
        if tp * cp != 1:
            raise ValueError(f"--tp {tp} --cp {cp} needs {tp * cp} ranks: launch with torchrun or srun")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return parallel_state.initialize(tp, cp, cp_impl=cp_impl, ulysses_size=ulysses_size, num_heads=num_heads)
