"""Fit the tiny VAE38 to the sample world and write it as a VAE folder (diffusers layout, fp16 safetensors).

    python -m megawan.tools.fit_vae                       # rewrites the package's tiny_sample VAE (data.vae: tiny_sample)
    python -m megawan.tools.fit_vae --out outputs/my_vae --steps 500

The model is the "tiny" VAE38 preset (the release's structure at widths 8 / 16), randomly initialised with
``--seed`` and trained by ``megawan.vae.fit`` (loss: per-pixel MSE + kl_weight x KL, see there) on clips that
``megawan.tools.make_sample_data`` renders on demand (``render_clip``: fresh states and backgrounds per clip,
rendered at 256 px and resized to --size like the data loader does). It is scored on clips of the sample
data's held-out split (val_v2.0_raw, decoded from its mp4; made with the default arguments if absent):
reconstruction PSNR before, during and after the fit, printed and written to fit.json beside the weights,
with the PSNR after the fp16 rounding of the written weights. The latent normalisation (config.json's
latents_mean / latents_std) is then set from the fitted encoder's statistics on freshly rendered clips. A fit continued from
a folder (--init) records in its fit.json the chain of stages that folder's fit.json lists, then its own command.
Use batch sizes >= 2: at batch 1 PyTorch runs these small 3-D convolutions through its slow reference kernel
(2.3x the cost per clip, docs/vae.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from megawan.data.transforms import frames_to_video
from megawan.vae import WanVAE38, WanVAE38Config
from megawan.vae.fit import (VAEFitConfig, fit, random_crops, reconstruction_psnr, set_latent_normalisation,
                             start_posterior_narrow)
from megawan.vae.pretrained import FITTED_DIR, FIT_REPORT, packaged_vae

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def rendered_clips(seed: int, count: int, frames: int, size: int, render_size: int = 256) -> torch.Tensor:
    """``count`` fresh sample-world clips [count, 3, frames, size, size] in [-1, 1], drawn from ``seed``."""
    from megawan.tools.make_sample_data import render_clip

    rng = np.random.default_rng(seed)
    return torch.stack([frames_to_video(torch.from_numpy(render_clip(rng, frames, render_size)), (size, size))
                        for _ in range(count)])


def held_out_clips(root, frames: int, size: int, count: int) -> list[torch.Tensor]:
    """``count`` clips spread evenly over a 1X split, [3, frames, size, size] each."""
    from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset

    data = WorldModel1XDataset(WorldModel1XConfig(root=str(root), clip_frames=frames, size=(size, size)))
    n = min(count, len(data))
    return [data[round(i * (len(data) - 1) / max(1, n - 1))]["video"] for i in range(n)]


def earlier_stages(init) -> list[str]:
    """The commands of the stages that made ``init``'s weights, oldest first (its fit.json's "stages"), without
    packaging-only runs (--steps 0); [] for a fit from random weights or a folder without a fit.json."""
    report = Path(init) / FIT_REPORT if init else None
    if report is None or not report.is_file():
        return []
    stages = json.loads(report.read_text()).get("stages", [])
    return [s for s in stages if "--steps 0" not in s and not s.startswith("this command")]


def build_parser() -> argparse.ArgumentParser:
    d = VAEFitConfig()
    p = argparse.ArgumentParser(prog="python -m megawan.tools.fit_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(FITTED_DIR / "tiny_sample"),
                   help="output folder (default: the package's tiny_sample VAE, which it replaces)")
    p.add_argument("--data", default="outputs/sample_1x",
                   help="sample data folder whose val_v2.0_raw is the held-out split (made if absent)")
    p.add_argument("--size", type=int, default=64, help="frame size trained and scored (the tiny_1x preset's)")
    p.add_argument("--clip-frames", type=int, default=9, help="frames per training clip (4n + 1)")
    p.add_argument("--crop", type=int, default=None,
                   help="train on one random crop x crop window of each clip (a multiple of 16 px; default: whole "
                        "frames); held-out scores stay on whole frames")
    p.add_argument("--held-out-frames", type=int, default=33, help="frames per held-out clip (4n + 1)")
    p.add_argument("--held-out-clips", type=int, default=8)
    p.add_argument("--stats-clips", type=int, default=64, help="rendered clips for the latent statistics")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--logvar-init", type=lambda v: None if v == "none" else float(v), default=-8.0,
                   help="initial posterior log-variance (bias of quant_conv's log-variance half) of a fit from "
                        "random weights; 'none' keeps PyTorch's init (~0: z is almost all noise)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the written weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--init", default=None, help="start from this VAE folder's weights instead of the random preset")
    p.add_argument("--snapshot", default=None, help="also write the VAE here at every evaluation (a long fit's "
                                                    "intermediate result)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if (args.clip_frames - 1) % 4 or (args.held_out_frames - 1) % 4 or args.size % 16:
        raise SystemExit("--clip-frames and --held-out-frames must be 4n + 1 and --size a multiple of 16")
    if args.crop is not None and (args.crop % 16 or not 16 <= args.crop <= args.size):
        raise SystemExit(f"--crop must be a multiple of 16 px between 16 and --size {args.size}, got {args.crop}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "val_v2.0_raw").is_dir():
        from megawan.tools.make_sample_data import make_sample_data

        make_sample_data(data)
    held_out = held_out_clips(data / "val_v2.0_raw", args.held_out_frames, args.size, args.held_out_clips)
    train_split = held_out_clips(data / "train_v2.0_raw", args.held_out_frames, args.size, args.held_out_clips)
    config = VAEFitConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                          warmup_steps=args.warmup_steps, kl_weight=args.kl_weight, seed=args.seed,
                          eval_every=args.eval_every)

    torch.manual_seed(args.seed)
    vae = WanVAE38(WanVAE38Config.preset("tiny"))
    if args.init:  # continue a fit (e.g. on longer clips) from a VAE folder's weights
        vae.load_state_dict(packaged_vae(args.init).state_dict())
    elif args.logvar_init is not None:
        start_posterior_narrow(vae, args.logvar_init)

    def batches(step: int) -> torch.Tensor:  # fresh clips every step, never the held-out split's
        seed = 1_000_003 * (args.seed + 1) + step
        clips = rendered_clips(seed, args.batch_size, args.clip_frames, args.size)
        return clips if args.crop is None else random_crops(clips, args.crop, torch.Generator().manual_seed(seed))

    stats_clips = list(rendered_clips(2**31 - 1 - args.seed, args.stats_clips, args.clip_frames, args.size))
    out = Path(args.out)

    command = "python -m megawan.tools.fit_vae " + " ".join(sys.argv[1:] if argv is None else argv)
    earlier = earlier_stages(args.init)
    copy_module = copy.deepcopy

    def snapshot(history: list[dict], model: WanVAE38) -> None:  # a usable VAE folder while the fit goes on
        row = history[-1]
        if args.snapshot and row["step"] < config.steps:
            copy = copy_module(model)
            set_latent_normalisation(copy, stats_clips[:8])
            folder = Path(args.snapshot)
            copy.to(DTYPES[args.dtype]).save_pretrained(folder, layout="diffusers")
            # its fit.json: enough to continue from it (--init) and keep the chain of stages that made it
            stage = (f"{command}, stopped after the step-{row['step']} snapshot "
                     f"({history[0]['held_out_psnr']:.2f} -> {row['held_out_psnr']:.2f} dB held-out, {row['seconds']:.0f} s)")
            (folder / FIT_REPORT).write_text(json.dumps(
                {"command": command, "snapshot_step": row["step"], "held_out_psnr_fp32": row["held_out_psnr"],
                 "stages": earlier + [stage]}, indent=1) + "\n")

    start = time.perf_counter()
    history = fit(vae, batches, held_out, config, on_eval=snapshot, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - start
    mean, std = set_latent_normalisation(vae, stats_clips)

    out.mkdir(parents=True, exist_ok=True)
    vae.to(DTYPES[args.dtype]).save_pretrained(out, layout="diffusers")
    saved = packaged_vae(out)  # read back as every user will: fp32 from the written dtype
    report = {
        "command": command,
        "fit": {**vars(config), "clip_frames": args.clip_frames, "crop": args.crop, "size": args.size,
                "init": args.init,
                "data": "clips rendered by megawan.tools.make_sample_data.render_clip (256 px, resized)"},
        "loss": "mean((decode(z) - x)^2) + kl_weight * mean(KL(q(z|x) || N(0, I))), z a posterior sample",
        "held_out": f"{len(held_out)} clips x {args.held_out_frames} frames at {args.size}x{args.size}, "
                    f"val_v2.0_raw of the sample data (H.264, decoded)",
        "held_out_psnr_start": history[0]["held_out_psnr"],  # the random preset, or --init's weights
        "held_out_psnr_fp32": history[-1]["held_out_psnr"],
        "held_out_psnr_written": reconstruction_psnr(saved, held_out),
        "train_split_psnr_written": reconstruction_psnr(saved, train_split),
        "weights_dtype": args.dtype,
        "weights_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "latents_mean": mean, "latents_std": std,
        "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "history": history,
        # every stage that made these weights, oldest first: the chain of --init folders' fit.json
        "stages": earlier + [f"{command} ({history[0]['held_out_psnr']:.2f} -> {history[-1]['held_out_psnr']:.2f} "
                             f"dB held-out in {config.steps} steps, {seconds:.0f} s)"],
    }
    (out / FIT_REPORT).write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out reconstruction PSNR: {report['held_out_psnr_start']:.2f} dB at the start -> "
          f"{report['held_out_psnr_written']:.2f} dB fitted ({args.dtype} weights; fp32 "
          f"{report['held_out_psnr_fp32']:.2f} dB); train split {report['train_split_psnr_written']:.2f} dB; "
          f"{seconds:.0f} s; wrote {out} ({report['weights_bytes'] / 2**20:.2f} MiB of weights)")
    return report


if __name__ == "__main__":
    main()
