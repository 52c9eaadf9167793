"""One full-width Wan DiT block on one GPU, bf16 forward and forward+backward: TFLOP/s and peak memory.

The block is ``WanDiT(...).blocks[0]`` (TP = CP = 1) with the release's widths (dim 3072, 24 heads of
128, ffn 14336, 512 text tokens), bf16 GEMM weights, fp32 residual stream / modulation / norms, random
weights. Inputs as inside the model: x [L, 1, 3072] fp32, per-token e0 [L, 1, 6, 3072] fp32, text
context [512, 1, 3072] bf16, all requiring grad, RoPE tables for a (frames, rows, cols) grid. Mode
``compiled-bf16-stream`` feeds x in bf16 (``DiTRuntime.residual_dtype``, the lower-precision option).

FLOPs per block forward (batch 1, L video tokens, Lt = 512 text tokens, D = 3072, F = 14336), counting
2*M*N*K per GEMM and nothing for element-wise work (norms, RoPE, modulation, softmax, GELU):

    self-attention q, k, v, o   4 * 2 L D D
    cross-attention q, o        2 * 2 L D D
    cross-attention k, v        2 * 2 Lt D D
    FFN fc1, fc2                2 * 2 L D F
    self-attention core         4 L^2 D      (Q K^T and P V, 2 L^2 D each)
    cross-attention core        4 L Lt D
    backward                    2 x forward  (fwd+bwd = 3 x forward)

TFLOP/s = those FLOPs / the measured time (CUDA events, mean over --iters after --warmup). Peak memory
is ``torch.cuda.max_memory_allocated`` over one forward+backward (stats reset just before it), shown
whole and above the allocation before it (weights + inputs).

    python bench/bench_dit_block_gpu.py --tokens 5120 27280 --modes eager compiled

``--modes compiled`` runs the block through ``megawan.models.dit.compile_blocks`` (what
``DiTRuntime(compile_blocks=True)`` does); the first calls (warm-up) compile. ``--profile`` prints the
CUDA kernels of one compiled forward+backward at the largest token count, by total time, to say
where the time goes (GEMMs, attention, element-wise kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table, write_rows_json  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.layers.linear import resolve_linear_impl  # noqa: E402
from megawan.layers.rope import rope_tables  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig, compile_blocks  # noqa: E402

# mode -> (compiled, residual stream dtype)
MODES = {"eager": (False, torch.float32), "compiled": (True, torch.float32),
         "compiled-bf16-stream": (True, torch.bfloat16)}
# Token grids (post-patch frames x rows x cols) for the token counts of the issue; others get 1 x 1 x L.
GRIDS = {5120: (5, 32, 32), 27280: (31, 22, 40)}


def block_flops(tokens: int, dim: int, ffn: int, text_len: int) -> dict:
    L, D, F, Lt = tokens, dim, ffn, text_len
    fwd = (4 * 2 * L * D * D + 2 * 2 * L * D * D + 2 * 2 * Lt * D * D + 2 * 2 * L * D * F
           + 4 * L * L * D + 4 * L * Lt * D)
    return {"fwd": fwd, "fwd+bwd": 3 * fwd}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int) -> float:
    """Mean seconds per call of fn."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def run_case(block, cfg, tokens: int, grid, device, warmup: int, iters: int,
             residual_dtype: torch.dtype = torch.float32) -> dict:
    D = cfg.dim
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, 1, D, device=device, generator=g).to(residual_dtype).requires_grad_(True)
    e0 = (0.1 * torch.randn(tokens, 1, 6, D, device=device, generator=g)).requires_grad_(True)
    context = torch.randn(cfg.text_len, 1, D, device=device, generator=g, dtype=torch.bfloat16).requires_grad_(True)
    cos, sin = rope_tables(cfg.head_dim, grid, 0, tokens, tokens, cfg.rope_theta, device=device)
    grad_out = torch.randn(tokens, 1, D, device=device, generator=g).to(residual_dtype)

    def fwd():
        with torch.no_grad():
            block(x, e0, context, cos, sin, tokens)

    def fwd_bwd():
        block.zero_grad(set_to_none=True)
        x.grad = e0.grad = context.grad = None
        block(x, e0, context, cos, sin, tokens).backward(grad_out)

    t_fwd = _time(fwd, device, warmup, iters)
    t_step = _time(fwd_bwd, device, warmup, iters)
    mem = {}
    if device.type == "cuda":
        block.zero_grad(set_to_none=True)
        x.grad = e0.grad = context.grad = None
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fwd_bwd()
        torch.cuda.synchronize(device)
        mem = {"base": base, "peak": torch.cuda.max_memory_allocated(device)}
    flops = block_flops(tokens, D, cfg.ffn_dim, cfg.text_len)
    return {"tokens": tokens, "grid": grid, "t_fwd": t_fwd, "t_step": t_step, "flops": flops, "mem": mem}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[5120, 27280])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--linear-impl", default="auto", choices=["auto", "local", "te"])
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "flash", "te"])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=list(MODES),
                   help="compiled-bf16-stream: compiled, residual stream in bf16 (DiTRuntime.residual_dtype)")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one fwd+bwd")
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--ffn-dim", type=int, default=14336)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on CPU (tiny dims advised) to check the script itself; prints no benchmark figures")
    p.add_argument("--json", default=None, help="also write the table's rows to this JSON file")
    args = p.parse_args(argv)

    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("bench_dit_block_gpu.py: no CUDA device found (torch.cuda.is_available() is False). "
                         "This benchmark measures one DiT block on an H100/H200 GPU; nothing was measured. "
                         "Run it on a GPU machine: python bench/bench_dit_block_gpu.py --tokens 5120 27280")
    groups = parallel_state.get_groups()  # one process: TP = CP = 1
    device = torch.device("cpu") if args.cpu_smoke else groups.device
    linear_impl = resolve_linear_impl(args.linear_impl)
    cfg = WanDiTConfig(dim=args.dim, ffn_dim=args.ffn_dim, num_heads=args.heads, num_layers=1)
    # seeded through the model's one initialisation path: the same weights on CPU and GPU, in any layout
    model = WanDiT(cfg, groups, DiTRuntime(dtype=torch.bfloat16, linear_impl=args.linear_impl,
                                           attention_backend=args.attention_backend, compile_blocks=False), seed=0)
    attn = model.backend.attention_backend  # resolved (and logged) by the backend
    block = model.blocks[0].to(device).train()
    del model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a benchmark)"
    print(f"device: {name}; torch {torch.__version__}; linear_impl {linear_impl}; attention {attn}; "
          f"dim {cfg.dim}, {cfg.num_heads} heads, ffn {cfg.ffn_dim}, text {cfg.text_len} tokens, bf16 GEMMs; "
          f"warmup {args.warmup}, iters {args.iters}\n")
    rows = []
    cases = [(mode, tokens) for mode in args.modes for tokens in args.tokens]
    for mode, tokens in cases:
        compiled, residual_dtype = MODES[mode]
        if compiled:
            # A fresh compile per (mode, token count): the timed graph is the static one a run at this one
            # resolution gets, not dynamo's dynamic-shape recompile after the previous size.
            torch._dynamo.reset()
            if not getattr(block, "_compiled_call_impl", None):
                compile_blocks([block])
        grid = GRIDS.get(tokens, (1, 1, tokens))
        r = run_case(block, cfg, tokens, grid, device, args.warmup, args.iters, residual_dtype)
        f = r["flops"]
        mem = r["mem"]
        rows.append([mode, f"{tokens:,}", "x".join(map(str, grid)),
                     f"{f['fwd'] / 1e12:.3f}", f"{r['t_fwd'] * 1e3:.2f}", f"{f['fwd'] / r['t_fwd'] / 1e12:.1f}",
                     f"{f['fwd+bwd'] / 1e12:.3f}", f"{r['t_step'] * 1e3:.2f}",
                     f"{f['fwd+bwd'] / r['t_step'] / 1e12:.1f}",
                     f"{mem['peak'] / 2**30:.2f}" if mem else "n/a",
                     f"{(mem['peak'] - mem['base']) / 2**30:.2f}" if mem else "n/a"])
    header = ["mode", "tokens", "grid", "fwd TFLOP", "fwd ms (no_grad)", "fwd TFLOP/s", "fwd+bwd TFLOP",
              "fwd+bwd ms", "fwd+bwd TFLOP/s", "peak GiB", "peak above base GiB"]
    print(format_table(rows, header))
    write_rows_json(args.json, header, rows, device=name, attention=attn, linear_impl=linear_impl)
    if args.profile:
        profile_block(block, cfg, max(args.tokens), device)


def profile_block(block, cfg, tokens: int, device) -> None:
    """The kernels of one forward+backward (after the timed runs: compiled graphs are warm)."""
    from torch.profiler import ProfilerActivity, profile

    grid = GRIDS.get(tokens, (1, 1, tokens))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_case(block, cfg, tokens, grid, device, warmup=0, iters=1)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"\nkernels of one fwd (no_grad) + one fwd+bwd at {tokens:,} tokens, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


if __name__ == "__main__":
    main()
