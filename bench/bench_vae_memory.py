"""Per-rank peak memory of a VAE38 decode sharded over N ranks, plus halo / K-V gather bytes per frame.

Memory is the process's peak resident set (kernel ``VmHWM``) above its resident set once the weights
are built and one small warm-up decode has run; the high-water mark is reset through
``/proc/self/clear_refs`` just before the measured decode. It covers everything the decode touches
(activations, the 2-frame caches, halo buffers, the output tile, allocator slack), is independent of the
torch allocator, and is measured in each rank's own process. On a GPU, the same script reports
``torch.cuda.max_memory_allocated`` above the post-weights baseline instead.

RSS includes what the C allocator keeps after ``free`` (glibc arenas, untrimmed heap tops), so ranks doing
identical work can report different peaks. ``--live-bytes`` adds the figure that does not depend on the C
allocator: the peak of live tensor bytes. A second, identical decode runs under
``torch.profiler.profile(profile_memory=True)``, which records every allocation and free made through
torch's CPU allocator while it is active (every tensor, including the temporaries inside kernels such as
oneDNN scratchpads and im2col buffers, from every thread of the rank) with its size and time. The running
sum of those sizes in time order is the number of tensor bytes allocated since the decode started and still
live; its maximum is the peak above the baseline (whatever was live before: weights, latents). Frees of
blocks allocated before profiling started are not reported, so the figure can only err high, never low.
``--malloc-arena-max`` / ``--malloc-trim-threshold`` set ``MALLOC_ARENA_MAX`` / ``MALLOC_TRIM_THRESHOLD_``
for the ranks (glibc reads them at process start; ranks are spawned fresh) to test allocator retention.

Weights are random (the figures do not depend on values); the structure and widths are the release's.

    python bench/bench_vae_memory.py --frames 17 --height 256 --width 256 --shards 1 2 4
    python bench/bench_vae_memory.py --frames 17 --height 256 --width 256 --shards 1 2 4 --live-bytes \
        --malloc-arena-max 1
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
from megawan.vae import conv as vae_conv  # noqa: E402
from megawan.vae.partition import CommStats  # noqa: E402
from megawan.vae.model import WanVAE38, WanVAE38Config  # noqa: E402
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


def _live_peak_bytes(run) -> tuple[int, int]:
    """(peak, end) live bytes allocated through torch's CPU allocator while ``run()`` executes, above what
    was live before: the running sum of the profiler's allocation (+) and free (-) records. ``end`` is what
    is still live when ``run`` returns (its result)."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    del result
    sizes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in sizes:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def _rank_main(config: WanVAE38Config, latent_shape: tuple, frames_per_step: int,
               live_bytes: bool = False, weight_group_bytes: int | None = None) -> dict:
    if weight_group_bytes is not None:  # this rank's copy of the module: the grouping of large conv weights
        vae_conv.WEIGHT_GROUP_BYTES = weight_group_bytes
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
    result = {"rank": int(os.environ["RANK"]), "peak_above_base": peak - base, "base": base, "seconds": seconds,
              "halo_bytes": stats.halo_bytes, "gather_bytes": stats.gather_bytes,
              "frames": video.shape[2], "tile": tuple(video.shape[3:]),
              "weight_group_bytes": vae_conv.WEIGHT_GROUP_BYTES}
    if live_bytes and not cuda:  # on a GPU, max_memory_allocated above is already a live-tensor figure
        del video
        gc.collect()
        live_peak, live_end = _live_peak_bytes(
            lambda: model.decode(latents, groups.vae_group, frames_per_step=frames_per_step))
        result.update(live_peak_above_base=live_peak, live_output_bytes=live_end)
    return result


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
    parser.add_argument("--live-bytes", action="store_true",
                        help="also run a profiled decode per rank and report the peak of live tensor bytes")
    parser.add_argument("--malloc-arena-max", type=int, help="set MALLOC_ARENA_MAX for the ranks (glibc)")
    parser.add_argument("--malloc-trim-threshold", type=int,
                        help="set MALLOC_TRIM_THRESHOLD_ (bytes) for the ranks (glibc)")
    parser.add_argument("--weight-group-bytes", type=int,
                        help="set megawan.vae.conv.WEIGHT_GROUP_BYTES in the ranks (default: the module's 8 MiB); "
                             "a value above the largest weight, e.g. 1099511627776, switches the output-channel "
                             "grouping off (the 'before' of docs/benchmarks.md)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    # spawned ranks inherit the environment; glibc reads these when the rank process starts
    if args.malloc_arena_max is not None:
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    if args.malloc_trim_threshold is not None:
        os.environ["MALLOC_TRIM_THRESHOLD_"] = str(args.malloc_trim_threshold)

    config = WanVAE38Config.preset("tiny") if args.tiny else WanVAE38Config()
    latent_shape = (1, config.z_dim, (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    results = {}
    for n in args.shards:
        per_rank = run_distributed(_rank_main, n, config, latent_shape, args.frames_per_step, args.live_bytes,
                                   args.weight_group_bytes, timeout_s=3600)
        halo_analytic, gather_analytic = analytic_comm_bytes(config, latent_shape, n)
        results[n] = {"ranks": per_rank, "halo_analytic_interior": halo_analytic,
                      "gather_analytic": gather_analytic}
        print(json.dumps({n: results[n]}, default=str), flush=True)

    mib = 2 ** 20
    base = max(r["peak_above_base"] for r in results[args.shards[0]]["ranks"])
    print(f"\nVAE38 decode {args.frames} x {args.height} x {args.width}, latent {latent_shape}, "
          f"{'tiny' if args.tiny else 'full'} widths, frames_per_step={args.frames_per_step}, "
          f"WEIGHT_GROUP_BYTES={results[args.shards[0]]['ranks'][0]['weight_group_bytes']} (as the ranks ran it)")
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
    if args.live_bytes and "live_peak_above_base" in results[args.shards[0]]["ranks"][0]:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_")
                       if k in os.environ) or "default glibc malloc settings"
        live_base = max(r["live_peak_above_base"] for r in results[args.shards[0]]["ranks"])
        print(f"\nLive tensor bytes (profiled second decode) vs peak RSS ({env}):")
        print("| N | live peak above baseline, max rank (MiB) | vs N=1 | live peaks per rank (MiB) | "
              "RSS peak, max rank (MiB) | vs N=1 | RSS peaks per rank (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for n, res in results.items():
            ranks = res["ranks"]
            live = [r["live_peak_above_base"] for r in ranks]
            rss = [r["peak_above_base"] for r in ranks]
            print(f"| {n} | {max(live) / mib:.0f} | {max(live) / live_base:.2f} | "
                  f"{', '.join(f'{v / mib:.0f}' for v in live)} | {max(rss) / mib:.0f} | {max(rss) / base:.2f} | "
                  f"{', '.join(f'{v / mib:.0f}' for v in rss)} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
