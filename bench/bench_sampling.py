"""Sampling cost per step on the CPU, split into DiT, CFG and VAE (one process, tiny widths).

For each case the same TI2V request (image -> video, per-token timesteps, frame 0 pinned) is sampled three
ways with random weights: guidance 1 (one DiT forward per step: the "DiT" figure), batched CFG (cond and uncond
in one forward of batch 2) and sequential CFG (two forwards). "CFG" is what guidance adds per step over one
forward. The VAE figures are the condition encode (one frame) and the streamed decode of the whole video
(``iter_decode``, frame groups as they would go to the mp4). Median over --repeats runs of each.

    python bench/bench_sampling.py                       # tiny DiT (configs/tiny.json), tiny VAE
    python bench/bench_sampling.py --dit-config tiny --frames 17 --size 128 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402
from megawan.vae.model import WanVAE38, WanVAE38Config  # noqa: E402
from megawan.pipelines.pipeline import Request, WanSampler  # noqa: E402
from megawan.pipelines.sampling import SamplingConfig  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> list[list]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dit-config", default="tiny")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    groups = parallel_state.get_groups()
    torch.manual_seed(0)
    cfg = WanDiTConfig.load(args.dit_config)
    model = WanDiT(cfg, groups, DiTRuntime(linear_impl="local")).eval()
    vae = WanVAE38(WanVAE38Config.tiny()).eval()
    text = torch.randn(16, cfg.text_dim)
    null = torch.randn(4, cfg.text_dim)
    image = torch.rand(3, args.size, args.size) * 2 - 1
    rows = []
    for frames in args.frames:
        req = Request(text=text, image=image, frames=frames, seed=0)
        lat_f = (frames - 1) // 4 + 1
        tokens = lat_f * (args.size // 32) ** 2
        per_step = {}
        for name, guidance, mode in (("single", 1.0, "batched"), ("batched", 5.0, "batched"),
                                     ("sequential", 5.0, "sequential")):
            sampler = WanSampler(model, vae, groups, SamplingConfig(steps=args.steps, guidance=guidance, cfg=mode))
            cond = sampler.condition_latents(req)
            sampler.condition_latents = lambda r, c=cond: c  # time the denoising alone
            per_step[name] = _median_time(lambda: sampler.sample(req, null, progress=False), args.repeats) / args.steps
        enc = _median_time(lambda: vae.encode(image[None, :, None]), args.repeats)
        latents = torch.randn(1, 48, lat_f, args.size // 16, args.size // 16)
        dec = _median_time(lambda: [f for f in vae.iter_decode(latents)], args.repeats)
        rows.append([f"{frames}x{args.size}x{args.size}", tokens, f"{per_step['single'] * 1e3:.1f}",
                     f"{(per_step['batched'] - per_step['single']) * 1e3:.1f}",
                     f"{(per_step['sequential'] - per_step['single']) * 1e3:.1f}",
                     f"{enc * 1e3:.1f}", f"{dec * 1e3:.1f}", f"{dec / frames * 1e3:.2f}"])
    print(f"DiT {args.dit_config} (dim {cfg.dim}, {cfg.num_layers} layers), VAE38 tiny; {args.steps} steps, "
          f"median of {args.repeats}; ms")
    print(format_table(rows, ["video", "tokens", "DiT/step", "CFG batched +/step", "CFG sequential +/step",
                              "VAE encode (image)", "VAE decode (video)", "decode/frame"], left_columns=1))
    return rows


if __name__ == "__main__":
    main()
