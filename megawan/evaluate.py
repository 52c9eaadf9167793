"""Score a world model the way the 1X sampling challenge does, beside the copy-last-context-frame baseline.

    python -m megawan.evaluate --dit trained/ --vae Wan2.2_VAE.pth --data 1x/val_v2.0_raw --num-clips 64 \\
        --out eval.json
    bash launch/torchrun.sh 8 megawan.evaluate --tp 2 --cp 2 ...     # 2 replicas share the clips

Clips of --frames frames (77) are taken evenly spaced over the split (held out: point it at the val split); the
model gets the first 17 frames and the states of all 77 and predicts the rest. Prints a table and writes the
JSON (means, per-clip scores, settings) plus a contact sheet PNG beside it. See megawan/evaluation/rollouts.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from megawan import parallel_state
from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset
from megawan.evaluation.rollouts import METRICS, evaluate_rollouts
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.models.dit_config import WanDiTConfig
from megawan.vae.model import WanVAE38
from megawan.pipelines.release import locate, start_groups
from megawan.pipelines.sampling import SamplingConfig
from megawan.pipelines.video_out import save_png

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class HeldOutClips:
    """``num_clips`` clips spread evenly over a 1X split, read only when indexed (each DP replica reads its own)."""

    def __init__(self, root, num_clips: int, frames: int = 77, size=None):
        self.data = WorldModel1XDataset(WorldModel1XConfig(root=str(root), clip_frames=frames, size=size))
        n = min(num_clips, len(self.data))
        self.indices = sorted({round(i * (len(self.data) - 1) / max(1, n - 1)) for i in range(n)})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.data[self.indices[i]]

    def describe(self) -> list[dict]:
        out = []
        for i in self.indices:
            position, first = self.data.index.locate(i)
            out.append({"index": i, "shard": self.data.shards[position].index, "first_frame": int(first)})
        return out


def load_text_embedding(path, text_dim: int) -> torch.Tensor:
    """[L, D] from a safetensors file's ``text_embeds`` (trailing all-zero padding rows dropped)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embedding file not found: {path}")
    emb = load_file(str(path)).get("text_embeds")
    if emb is None or emb.ndim != 2 or emb.shape[1] != text_dim:
        raise ValueError(f"{path} must hold text_embeds [L, {text_dim}], got "
                         f"{None if emb is None else tuple(emb.shape)}")
    nonzero = emb.abs().sum(1).nonzero()
    return emb[: int(nonzero.max()) + 1 if len(nonzero) else 0].float()


def format_table(result: dict) -> str:
    rows = ["| metric | model | copy-last-frame |", "|---|---:|---:|"]
    for m in METRICS:
        rows.append(f"| {m} | {result[m]:.3f} | {result['baseline_' + m]:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a 1X split folder (val_v2.0_raw, or the sample data's)")
    p.add_argument("--ckpt", help="checkpoint folder (DiT, VAE beside it)")
    p.add_argument("--dit")
    p.add_argument("--vae")
    p.add_argument("--state-dim", type=int, help="add zero-initialised state conditioning to a released model")
    p.add_argument("--text-embedding", help="safetensors with text_embeds [L, D]: the prompt embedding the model was "
                                            "trained with, e.g. a latent cache's empty_prompt.safetensors "
                                            "(default: no text tokens)")
    p.add_argument("--num-clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=77)
    p.add_argument("--context-frames", type=int, default=17)
    p.add_argument("--size", type=int, help="square frame size (default: the data's, 512 for 1X)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--solver", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", default="outputs/eval.json")
    args = p.parse_args(argv)

    files = locate(args.ckpt, dit=args.dit, vae=args.vae, need_text=False)
    config = WanDiTConfig.load(files.dit)
    if args.state_dim is not None:
        config = replace(config, state_dim=args.state_dim)
    size = (args.size, args.size) if args.size else None
    text = load_text_embedding(args.text_embedding, config.text_dim) if args.text_embedding else None
    clips = HeldOutClips(args.data, args.num_clips, args.frames, size)

    groups = start_groups(args.tp, args.cp, config.num_heads)
    dev = groups.device
    model = WanDiT.from_pretrained(files.dit, dtype=DTYPES[args.dtype], groups=groups, state_dim=args.state_dim,
                                   runtime=DiTRuntime(linear_impl="local" if dev.type == "cpu" else "auto"))
    vae = WanVAE38.from_pretrained(files.vae, device=dev)
    sampling = SamplingConfig(steps=args.steps, shift=args.shift, solver=args.solver, guidance=1.0)
    result = evaluate_rollouts(model, vae, clips, groups, text=text, config=sampling, context_frames=args.context_frames,
                               seed=args.seed, progress=True)
    sheet = result.pop("contact_sheet")
    result["clips"] = clips.describe()
    result["settings"] = {**vars(args), "sampling": sampling.to_dict(),
                          "layout": {"tp": groups.tp, "cp": groups.cp, "dp": groups.dp}}
    if torch.distributed.get_rank() == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        if sheet is not None:
            save_png(out.with_suffix(".png"), sheet.permute(1, 2, 0).contiguous())
        print(f"{result['num_clips']} clips, {args.frames} frames ({args.context_frames} given), "
              f"{args.steps} steps\n{format_table(result)}\nwrote {out}")
    parallel_state.destroy()
    return result


if __name__ == "__main__":
    main()
