"""bf16 vs FP8 GEMMs side by side on one GPU: one full-width DiT block at given token counts, and a full
TI2V-5B forward + backward ("train step" without the optimizer), every mode in the same run.

Block: as ``bench_dit_block_gpu.py`` (same inputs, same FLOP count, CUDA-event timing), built once per
FP8 mode from the same seed. TFLOP/s are bf16-equivalent: the FLOPs of the GEMMs and attention cores
divided by the time, whatever precision the GEMMs ran in. "rel err" = relative Frobenius error of the
block's forward output update (out - x) against the bf16 block with the same weights.

Full model: ``WanDiT`` with the 5B config (30 blocks), bf16 GEMM weights, activation checkpointing on,
per-token timesteps (latent frame 0 at t = 0), loss = mean square of the velocity, forward + backward.
121 x 704 x 1280 video = 31 x 44 x 80 latents = 27,280 tokens by default.

    python bench/bench_dit_fp8_gpu.py                      # 5,120 and 27,280 tokens, block + full model
    python bench/bench_dit_fp8_gpu.py --compile --no-model # the block under torch.compile, every mode
    python bench/bench_dit_fp8_gpu.py --cpu-smoke --dim 288 --ffn-dim 512 --heads 24 --tokens 64 \\
        --model-layers 2 --model-latents 2 4 4 --text-dim 64 --iters 1 --warmup 0   # checks the script
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table, write_rows_json  # noqa: E402
from bench.bench_dit_block_gpu import GRIDS, _time, run_case  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.layers.fp8 import FP8_MODES, _installed  # noqa: E402
from megawan.layers.rope import rope_tables  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig, compile_blocks  # noqa: E402


def _runtime(mode: str, attention_backend: str, checkpointing: bool = False) -> DiTRuntime:
    # native FP8 replaces the GEMMs of megatron's local linears; TE modes use TE's linears
    linear = "te" if mode.startswith("te-") else "local"
    # compile_blocks explicit: the default (None) would compile on CUDA, so "eager" rows would not be eager
    return DiTRuntime(dtype=torch.bfloat16, linear_impl=linear, attention_backend=attention_backend, fp8=mode,
                      activation_checkpointing=checkpointing, compile_blocks=False)


def block_update(block, cfg, tokens, grid, device) -> torch.Tensor:
    """The block's forward update for fixed inputs (for the numerics column)."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, 1, cfg.dim, device=device, generator=g)
    e0 = 0.1 * torch.randn(tokens, 1, 6, cfg.dim, device=device, generator=g)
    ctx = torch.randn(cfg.text_len, 1, cfg.dim, device=device, generator=g, dtype=torch.bfloat16)
    cos, sin = rope_tables(cfg.head_dim, grid, 0, tokens, tokens, cfg.rope_theta, device=device)
    with torch.no_grad(), block._fp8_context():
        return (block(x, e0, ctx, cos, sin, tokens) - x).float()


def bench_blocks(args, groups, device, modes):
    cfg = WanDiTConfig(dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.heads, num_layers=1,
                       text_dim=args.text_dim)
    rows, base = [], {}
    for mode in modes:
        # seeded through the model's one initialisation path: every mode gets the same weights, on any device
        model = WanDiT(cfg, groups, _runtime(mode, args.attention_backend), seed=0)
        block = model.blocks[0].to(device).train()
        block._fp8_context = model.backend.fp8_autocast  # TE modes: the model's autocast around the block
        compiled = args.compile and not mode.startswith("te-")  # TE modules are never compiled (graph breaks)
        if compiled:
            compile_blocks([block])  # as WanDiT does (the FP8 casts fuse into the block's graph)
        for tokens in args.tokens:
            if compiled:
                # A fresh compile per token count: the timed graph is the static one a run at this one
                # resolution gets, not dynamo's dynamic-shape recompile after the previous size.
                torch._dynamo.reset()
            grid = GRIDS.get(tokens, (1, 1, tokens))
            with block._fp8_context():
                r = run_case(block, cfg, tokens, grid, device, args.warmup, args.iters)
            upd = block_update(block, cfg, tokens, grid, device)
            key = tokens
            if mode == "off":
                base[key] = (r, upd)
            b, bu = base.get(key, (None, None))
            f = r["flops"]
            err = ((upd - bu).norm() / bu.norm()).item() if bu is not None else float("nan")
            rows.append([mode, f"{tokens:,}", f"{r['t_fwd'] * 1e3:.2f}", f"{f['fwd'] / r['t_fwd'] / 1e12:.1f}",
                         f"{r['t_step'] * 1e3:.2f}", f"{f['fwd+bwd'] / r['t_step'] / 1e12:.1f}",
                         f"{b['t_step'] / r['t_step']:.3f}" if b else "n/a",
                         f"{r['mem']['peak'] / 2**30:.2f}" if r["mem"] else "n/a", f"{err:.4f}"])
        del model, block
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"One block{' (torch.compile, te-* modes eager)' if args.compile else ' (eager)'}: "
          f"dim {cfg.dim}, {cfg.num_heads} heads, ffn {cfg.ffn_dim}; warmup {args.warmup}, "
          f"iters {args.iters}; TFLOP/s bf16-equivalent\n")
    header = ["fp8", "tokens", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "fwd+bwd speedup vs off",
              "peak GiB", "rel err vs off"]
    print(format_table(rows, header))
    write_rows_json(args.json, header, rows, compiled=bool(args.compile))


def bench_model(args, groups, device, modes):
    cfg = WanDiTConfig.preset("wan2.2-ti2v-5b") if args.model_layers is None else WanDiTConfig(
        dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.heads, num_layers=args.model_layers,
        text_dim=args.text_dim)
    f, h, w = args.model_latents
    tokens = f * (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, f, h, w, generator=g).to(device)
    t = torch.full((1, tokens), 700.0)
    t[:, : (h // 2) * (w // 2)] = 0.0
    t = t.to(device)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device)
    rows, base = [], None
    for mode in modes:
        model = WanDiT(cfg, groups, _runtime(mode, args.attention_backend, checkpointing=True), seed=0)
        model = model.to(device).train()

        def step():
            model.zero_grad(set_to_none=True)
            model(x, t, text).float().square().mean().backward()

        secs = _time(step, device, max(1, args.warmup // 2), max(1, args.iters // 4))
        peak = "n/a"
        if device.type == "cuda":
            model.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
        base = secs if mode == "off" else base
        rows.append([mode, f"{tokens:,}", f"{secs:.3f}", f"{base / secs:.3f}" if base else "n/a", peak])
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nFull model: {cfg.num_layers} blocks, dim {cfg.dim}, latents {f}x{h}x{w} ({tokens:,} tokens), "
          f"activation checkpointing, forward + backward (no optimizer step)\n")
    print(format_table(rows, ["fp8", "tokens", "step s", "speedup vs off", "peak GiB"]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[5120, 27280])
    p.add_argument("--modes", nargs="+", default=None, choices=FP8_MODES,
                   help="default: off and the native modes, plus the te-* modes when TE is installed")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--attention-backend", default="torch", choices=["auto", "torch", "flash", "te"])
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--ffn-dim", type=int, default=14336)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--no-model", action="store_true", help="skip the full-model step")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (as compile_blocks=True)")
    p.add_argument("--model-layers", type=int, default=None, help="default: the 5B preset (30 blocks)")
    p.add_argument("--model-latents", type=int, nargs=3, default=[31, 44, 80], metavar=("F", "H", "W"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on CPU (tiny dims) to check the script itself; its figures are not benchmarks")
    p.add_argument("--json", default=None, help="also write the block table's rows to this JSON file")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("bench_dit_fp8_gpu.py: no CUDA device found; nothing was measured. Run it on a GPU "
                         "machine (see bench/gpu_check.sh), or pass --cpu-smoke with tiny dims to check it.")
    modes = args.modes or ["off", "native-tensorwise", "native-rowwise"] + (
        ["te-delayed", "te-current"] if _installed("transformer_engine") and torch.cuda.is_available() else [])
    if modes[0] != "off":
        modes = ["off"] + [m for m in modes if m != "off"]  # the baseline runs first, in the same process
    groups = parallel_state.get_groups()
    device = torch.device("cpu") if args.cpu_smoke else groups.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a benchmark)"
    print(f"device: {name}; torch {torch.__version__}; modes {modes}; attention {args.attention_backend}\n")
    bench_blocks(args, groups, device, modes)
    if not args.no_model:
        bench_model(args, groups, device, modes)


if __name__ == "__main__":
    main()
