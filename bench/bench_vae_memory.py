"""Per-rank peak memory of a VAE38 decode sharded over N ranks, plus halo / K-V gather bytes per frame.

Memory is the process's peak resident set (kernel ``VmHWM``) above its resident set once the weights
are built and one small warm-up decode has run; the high-water mark is reset through
``/proc/self/clear_refs`` just before the measured decode. It covers everything the decode touches
(activations, the 2-frame caches, halo buffers, the output tile, allocator slack), is independent of the
torch allocator, and is measured in each rank's own process. On a GPU, the same script reports
``torch.cuda.max_memory_allocated`` above the post-weights baseline instead.

Weights are random (the figures do not depend on values); the structure and widths are the release's.

    python bench/bench_vae_memory.py --frames 17 --height 256 --width 256 --shards 1 2 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megawan import parallel_state  # noqa: E402
from megawan.layers.vae_partition import CommStats  # noqa: E402
from megawan.models.vae import WanVAE38, WanVAE38Config  # noqa: E402
from megawan.testing import run_distributed  # noqa: E402

BYTES = 4  # fp32


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _random_decoder(config: WanVAE38Config, device) -> WanVAE38:
    """Allocate only what decode uses (decoder + post_quant_conv), filled with scaled random values."""
    with torch.device("meta"):
        model = WanVAE38(config)
    gen = torch.Generator().manual_seed(0)
    for module in (model.decoder, model.post_quant_conv):
        module.to_empty(device=device)
        for name, p in module.named_parameters():
            with torch.no_grad():
                if name.endswith("gamma"):
                    p.fill_(1.0)
                elif p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5))
                else:
                    p.zero_()
    return model.eval()


def _rank_main(config: WanVAE38Config, latent_shape: tuple, frames_per_step: int) -> dict:
    world = int(os.environ["WORLD_SIZE"])
    groups = parallel_state.initialize(1, 1, vae_shards=world, num_heads=None)
    device = groups.device
    cuda = device.type == "cuda"
    model = _random_decoder(config, device)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1)).to(device)
    model.decode(latents[:, :, :2, :, :], groups.vae_group)  # warm-up: thread pools, gloo pairs, kernels
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        base = _rss_kib("VmRSS") * 1024
    stats = CommStats()
    start = time.perf_counter()
    video = model.decode(latents, groups.vae_group, frames_per_step=frames_per_step, stats=stats)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return {"rank": int(os.environ["RANK"]), "peak_above_base": peak - base, "base": base, "seconds": seconds,
            "halo_bytes": stats.halo_bytes, "gather_bytes": stats.gather_bytes,
            "frames": video.shape[2], "tile": tuple(video.shape[3:])}


def analytic_comm_bytes(config: WanVAE38Config, latent_shape: tuple, shards: int) -> tuple[int, int]:
    """(halo bytes sent by a rank with two neighbours, or one if N = 2; K/V bytes received by any rank)
    for one decode in row bands, one latent frame per step.

    Derived from the architecture, not from the code path: each 3x3x3 conv exchanges 1 row of its input,
    which is the chunk plus 2 cached frames; each spatial upsample exchanges 1 low-resolution row per frame;
    the mid attention receives the K and V of the other tiles for every latent frame.
    """
    b, z, t_lat, h, w = latent_shape
    rows_per_tile = -(-h // shards)
    neighbours = 2 if shards > 2 else 1
    dims = [config.decoder_base_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
    temporal = (*config.temporal_downsample[::-1], False)
    halo = 0
    for step in range(t_lat):
        frames, width = 1, w

        def conv3(channels: int) -> int:
            return neighbours * b * channels * (frames + 2) * width * BYTES

        halo += conv3(z)                               # conv_in
        halo += 4 * conv3(dims[0])                     # mid: 2 residual blocks x 2 convs
        for i in range(len(config.dim_mult)):
            c_in, c_out = dims[i], dims[i + 1]
            halo += conv3(c_in) + (2 * config.num_res_blocks + 1) * conv3(c_out)
            if i != len(config.dim_mult) - 1:
                if temporal[i] and step > 0:
                    frames *= 2
                halo += neighbours * b * c_out * frames * width * BYTES  # upsample: low-resolution row
                width *= 2
        halo += conv3(dims[-1])                        # conv_out
    gather = t_lat * b * (shards - 1) * rows_per_tile * w * 2 * dims[0] * BYTES
    return (halo if shards > 1 else 0), (gather if shards > 1 else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames-per-step", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke test of the script)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    config = WanVAE38Config.tiny() if args.tiny else WanVAE38Config()
    latent_shape = (1, config.z_dim, (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    results = {}
    for n in args.shards:
        per_rank = run_distributed(_rank_main, n, config, latent_shape, args.frames_per_step, timeout_s=3600)
        halo_analytic, gather_analytic = analytic_comm_bytes(config, latent_shape, n)
        results[n] = {"ranks": per_rank, "halo_analytic_interior": halo_analytic,
                      "gather_analytic": gather_analytic}
        print(json.dumps({n: results[n]}, default=str), flush=True)

    mib = 2 ** 20
    base = max(r["peak_above_base"] for r in results[args.shards[0]]["ranks"])
    print(f"\nVAE38 decode {args.frames} x {args.height} x {args.width}, latent {latent_shape}, "
          f"{'tiny' if args.tiny else 'full'} widths, frames_per_step={args.frames_per_step}")
    print("| N | tile (px) | peak above baseline, max rank (MiB) | vs N=1 | halo sent/frame by rank 1 "
          "(measured / analytic, MiB) | K/V gathered/frame (measured / analytic, MiB) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for n, res in results.items():
        ranks = res["ranks"]
        frames = ranks[0]["frames"]
        peak = max(r["peak_above_base"] for r in ranks)
        interior = ranks[1] if n > 1 else ranks[0]
        print(f"| {n} | {ranks[0]['tile'][0]} x {ranks[0]['tile'][1]} | {peak / mib:.0f} | {peak / base:.2f} | "
              f"{interior['halo_bytes'] / frames / mib:.2f} / {res['halo_analytic_interior'] / frames / mib:.2f} | "
              f"{interior['gather_bytes'] / frames / mib:.2f} / {res['gather_analytic'] / frames / mib:.2f} | "
              f"{max(r['seconds'] for r in ranks):.1f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
