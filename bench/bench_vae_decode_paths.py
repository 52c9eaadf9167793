"""VAE38 decode on one GPU: fp32, bf16, channels-last and compiled paths (megawan/vae/fast.py) against the
fp32 decode, and diffusers' ``AutoencoderKLWan`` with the same weights: time, peak memory, error.

Weights: random, the release's widths (scaled normal, so outputs are not saturated by the [-1, 1] clamp),
written once in diffusers' layout and read by ``AutoencoderKLWan.from_pretrained``. Latents: [1, 48, T, h, w]
normal (default 31 x 44 x 80, a 121 x 704 x 1280 video). Error = rel. L2 and max |diff| of the decoded video
against megawan's fp32 decode. Time: one timed decode after one warm-up decode (which compiles, for the
compiled paths); peak = ``torch.cuda.max_memory_allocated`` over the timed decode, weights included.

    python bench/bench_vae_decode_paths.py                        # 121 x 704 x 1280
    python bench/bench_vae_decode_paths.py --cpu-smoke            # tiny VAE on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402

from megawan.vae.fast import prepare_decode  # noqa: E402
from megawan.vae.model import WanVAE38, WanVAE38Config  # noqa: E402

PATHS = {  # name: (dtype, channels_last, compile)
    "fp32": (torch.float32, False, False),
    "fp32 channels-last": (torch.float32, True, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16 channels-last": (torch.bfloat16, True, False),
    "bf16 channels-last compiled": (torch.bfloat16, True, True),
}


def random_vae(config: WanVAE38Config) -> WanVAE38:
    torch.manual_seed(0)
    vae = WanVAE38(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif not name.endswith("gamma"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def timed(fn, device) -> tuple[object, float, int | None]:
    fn()  # warm-up (compiles where compiled)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, nargs=3, default=[31, 44, 80], metavar=("T", "H", "W"))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny VAE on CPU; checks the script only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("bench_vae_decode_paths.py: no CUDA device found; nothing was measured. Run it on a GPU "
                         "machine, or pass --cpu-smoke to check the script on a tiny VAE.")
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    config = WanVAE38Config.tiny() if args.cpu_smoke else WanVAE38Config()
    if args.cpu_smoke:
        args.latent = [3, 4, 3]
    t, h, w = args.latent
    latents = torch.randn(1, config.z_dim, t, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    base = random_vae(config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a benchmark)"
    print(f"device: {name}; torch {torch.__version__}; latents {list(latents.shape)} -> video "
          f"{4 * (t - 1) + 1} x {16 * h} x {16 * w}\n", flush=True)

    results, ref = {}, None
    for path in args.paths:
        dtype, channels_last, compiled = PATHS[path]
        vae = prepare_decode(copy.deepcopy(base).to(device), dtype, channels_last=channels_last, compile=compiled)
        with torch.no_grad():
            out, seconds, peak = timed(lambda: vae.decode(latents.to(dtype)), device)
        out = out.float().cpu()
        ref = out if path == "fp32" else ref
        results[path] = (out, seconds, peak)
        del vae
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.no_diffusers:
        from diffusers import AutoencoderKLWan

        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(Path(tmp) / "vae", layout="diffusers")
            ref_vae = AutoencoderKLWan.from_pretrained(Path(tmp) / "vae").to(device).eval()
        mean, std = base._latent_stats(latents)
        with torch.no_grad():  # diffusers decodes raw latents: undo megawan's normalisation first
            out, seconds, peak = timed(lambda: ref_vae.decode(latents * std + mean, return_dict=False)[0], device)
        results["diffusers fp32"] = (out.float().cpu(), seconds, peak)
        del ref_vae

    slowest_ref = results.get("diffusers fp32", (None, None))[1]
    rows = []
    for path, (out, seconds, peak) in results.items():
        err = ((out - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
        rows.append([path, f"{seconds:.2f}", f"{peak / 2**30:.1f}" if peak is not None else "n/a",
                     f"{slowest_ref / seconds:.2f}x" if slowest_ref else "n/a",
                     f"{err:.2e}", f"{(out - ref).abs().max().item():.2e}" if ref is not None else "n/a"])
    print(format_table(rows, ["path", "s", "peak GiB", "speed vs diffusers fp32", "rel. L2 vs megawan fp32",
                              "max |diff|"], left_columns=1))


if __name__ == "__main__":
    main()
