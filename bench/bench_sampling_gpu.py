"""GPU: Wan 2.2 TI2V-5B time per sampling step and VAE decode time, megawan beside diffusers (one GPU).

Random weights at the released sizes (timings do not depend on values). One sampling step = one batched-CFG
forward (batch 2: cond + uncond) with per-token timesteps (latent frame 0 at t = 0) and 512 text tokens, plus
the UniPC update; the same inputs go to diffusers' WanTransformer3DModel (the transformer WanPipeline runs per
step). Cases: 121 x 704 x 1280 (latent 31 x 44 x 80 = 27,280 tokens) and the 1X set-up, 77 x 512 x 512
(20 x 32 x 32 = 5,120 tokens). VAE: decode of the 121-frame 704 x 1280 latent, megawan's WanVAE38 (one
rank, unsharded) beside diffusers' AutoencoderKLWan with the same config. Median of --repeats after a warm-up.
Not yet run (no GPU was available to the task that wrote it).

    python bench/bench_sampling_gpu.py [--cases 27280 5120] [--repeats 3] [--skip-vae]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.diffusion.solvers import FlowUniPC, flow_sigmas  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402
from megawan.vae.model import WanVAE38, config_to_diffusers  # noqa: E402

CASES = {27280: (31, 44, 80), 5120: (20, 32, 32)}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _inputs(f, h, w, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 48, f, h, w, generator=g).to(dev)
    per_frame = (h // 2) * (w // 2)
    t = torch.full((2, f * per_frame), 937.0, device=dev)
    t[:, :per_frame] = 0.0
    text = torch.randn(2, 512, 4096, generator=g).to(dev, torch.bfloat16)
    return x, t, text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, nargs="+", default=list(CASES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_sampling_gpu.py needs a CUDA GPU")
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    groups = parallel_state.get_groups()
    dev = groups.device
    cfg = WanDiTConfig()
    rows = []
    ours = WanDiT(cfg, groups, DiTRuntime(dtype=torch.bfloat16)).eval()
    theirs = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128,
                                   in_channels=48, out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336,
                                   num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                   eps=1e-6).to(dev, torch.bfloat16).eval()
    for tokens in args.cases:
        x, t, text = _inputs(*CASES[tokens], dev)
        sigmas, _ = flow_sigmas(50)

        def ours_step():
            with torch.no_grad():
                v = ours(x, t, text).float()
                cond, uncond = v.chunk(2)
                FlowUniPC(sigmas).step(uncond + 5.0 * (cond - uncond), x[:1].float())

        def theirs_step():
            with torch.no_grad():
                v = theirs(hidden_states=x.to(torch.bfloat16), timestep=t, encoder_hidden_states=text,
                           return_dict=False)[0].float()
                cond, uncond = v.chunk(2)
                FlowUniPC(sigmas).step(uncond + 5.0 * (cond - uncond), x[:1].float())

        a, b = _time(ours_step, args.repeats), _time(theirs_step, args.repeats)
        rows.append([f"DiT step (CFG batch 2), {tokens} tokens", f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}"])
        print(rows[-1], flush=True)
    del ours, theirs
    torch.cuda.empty_cache()
    if not args.skip_vae:
        dtype = torch.float32 if args.vae_dtype == "fp32" else torch.bfloat16
        vae = WanVAE38().to(dev, dtype).eval()
        ref = AutoencoderKLWan(**{k: v for k, v in config_to_diffusers(vae.config).items()
                                  if not k.startswith("_")}).to(dev, dtype).eval()
        z = torch.randn(1, 48, 31, 44, 80, device=dev, dtype=dtype)
        torch.cuda.reset_peak_memory_stats()
        a = _time(lambda: [f for f in vae.iter_decode(z)], args.repeats)
        peak_a = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            b = _time(lambda: ref.decode(z).sample, args.repeats)
        peak_b = torch.cuda.max_memory_allocated() / 2**30
        rows.append([f"VAE decode 121x704x1280 ({args.vae_dtype}); peak GiB {peak_a:.1f} vs {peak_b:.1f}",
                     f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}"])
    print(f"{torch.cuda.get_device_name()}; seconds, median of {args.repeats}")
    print(format_table(rows, ["what", "megawan s", "diffusers s", "diffusers / megawan"], left_columns=1))


if __name__ == "__main__":
    main()
