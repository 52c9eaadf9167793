"""The full Wan 2.2 TI2V-5B DiT, megawan vs diffusers' ``WanTransformer3DModel``, same weights and inputs,
one GPU, side by side in one run: forward and train step (forward + backward of an MSE loss), time and
peak memory, and the output difference.

Weights: megawan's random initialisation (seed 0, bf16 GEMM weights; embeddings, modulation, norms and
head fp32), written once in diffusers' layout and assigned to a ``WanTransformer3DModel`` built from that config,
then cast to bf16 outside its ``_keep_in_fp32_modules`` (what ``from_pretrained(torch_dtype=bf16)`` does;
that call needs accelerate, which the GPU machine lacks).
Inputs (batch 1): latents [1, 48, F, H, W] (default 31 x 44 x 80 = 27,280 tokens, a 121 x 704 x 1280
video), per-token timesteps with latent frame 0 at t = 0 (TI2V), a 512 x 4096 text embedding.

Each side runs in its own phase (the other side is off the GPU), in each mode asked for:
  eager      no compilation;
  compiled   megawan ``DiTRuntime(compile_blocks=True)``; diffusers ``compile_repeated_blocks()``.
Train steps: diffusers recomputes every block whole (``enable_gradient_checkpointing``); megawan runs
each ``--recompute`` setting (none, full, selective, ffn; ``selective:N`` = selective on the first N
blocks only). An out-of-memory step is reported as OOM, not as a failure of the run.
Timing: CUDA events, mean over --iters after --warmup calls (the first compiled call compiles).
Peak memory: ``torch.cuda.max_memory_allocated`` over one measured call, whole (weights included).

    python bench/bench_dit_full_gpu.py                                      # 27,280 tokens, 30 blocks
    python bench/bench_dit_full_gpu.py --modes compiled --recompute full selective ffn
    python bench/bench_dit_full_gpu.py --modes compiled --residual-dtypes float32 bfloat16
    python bench/bench_dit_full_gpu.py --cpu-smoke                          # checks the script only
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402
from bench.bench_dit_block_gpu import block_flops  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.checkpoint.dit_io import save_dit_weights  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup: int, iters: int) -> dict:
    """Mean seconds per call and peak memory of one call; {'oom': True} when the GPU runs out."""
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return {"s": start.elapsed_time(end) / 1000 / iters, "peak": torch.cuda.max_memory_allocated(device)}
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return {"s": (time.perf_counter() - t0) / iters, "peak": None}
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"oom": True}


def make_inputs(cfg: WanDiTConfig, grid, device):
    g = torch.Generator().manual_seed(1)
    f, h, w = grid
    x = torch.randn(1, cfg.in_channels, f, h * 2, w * 2, generator=g)
    t = torch.full((1, f * h * w), 700.0)
    t[:, : h * w] = 0.0  # TI2V: the first latent frame is the clean conditioning image
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    target = torch.randn(x.shape, generator=g)
    return [v.to(device) for v in (x, t, text, target)]


STREAM_LABEL = "bf16-stream"


def _release_memory(device) -> None:
    """Free the last model before the next one is built (each case's peak memory is its own)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _recompute_runtime(setting: str) -> dict:
    if setting == "none":
        return {"activation_checkpointing": False}
    granularity, _, n = setting.partition(":")
    return {"activation_checkpointing": True, "recompute_granularity": granularity,
            "recompute_num_blocks": int(n) if n else None}


def run_megawan(cfg, groups, inputs, args, ckpt_dir, device) -> tuple[list, dict]:
    x, t, text, target = inputs
    rows, outs = [], {}
    for residual, mode in [(r, m) for r in args.residual_dtypes for m in args.modes]:
        label = mode if residual == "float32" else f"{mode}+{STREAM_LABEL}"
        for setting in ["forward"] + args.recompute:
            torch.manual_seed(0)
            torch._dynamo.reset()  # each model compiles afresh: no case runs into dynamo's recompile limit
            rt = DiTRuntime(dtype=torch.bfloat16, compile_blocks=mode == "compiled",
                            residual_dtype=getattr(torch, residual),
                            **({} if setting == "forward" else _recompute_runtime(setting)))
            model = WanDiT(cfg, groups, rt)
            if ckpt_dir is not None and not any(Path(ckpt_dir).iterdir()):
                save_dit_weights(model, ckpt_dir, layout="diffusers")
            if setting == "forward":
                model.eval()
                with torch.no_grad():
                    outs[label] = model(x, t, text).float().cpu()

                def fwd():
                    with torch.no_grad():
                        model(x, t, text)
                r = measure(fwd, device, args.warmup, args.iters)
            else:
                model.train()

                def step():
                    loss = torch.nn.functional.mse_loss(model(x, t, text).float(), target)
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                r = measure(step, device, args.warmup, args.iters)
            rows.append(("megawan", label, setting, r))
            del model
            _release_memory(device)
    return rows, outs


def load_diffusers_bf16(cls, ckpt_dir):
    """What ``from_pretrained(torch_dtype=bf16)`` gives (bf16 except the class's ``_keep_in_fp32_modules``),
    without accelerate, which that call needs and the GPU machine lacks: build without weight init, load
    the saved tensors, cast."""
    from diffusers.models.modeling_utils import no_init_weights
    from safetensors.torch import load_file

    with no_init_weights():
        model = cls.from_config(cls.load_config(ckpt_dir))
    state = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict(state, strict=True)
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if keep.intersection(name.split(".")) else torch.bfloat16)
    return model


def run_diffusers(ckpt_dir, inputs, args, device) -> tuple[list, dict]:
    from diffusers import WanTransformer3DModel

    x, t, text, target = inputs
    rows, outs = [], {}
    for mode in args.modes:
        for setting in ("forward", "full"):
            model = load_diffusers_bf16(WanTransformer3DModel, ckpt_dir).to(device)
            if mode == "compiled":
                model.compile_repeated_blocks()

            def call():
                return model(hidden_states=x.to(torch.bfloat16), timestep=t,
                             encoder_hidden_states=text.to(torch.bfloat16), return_dict=False)[0]
            if setting == "forward":
                model.eval()
                with torch.no_grad():
                    outs[mode] = call().float().cpu()

                def fwd():
                    with torch.no_grad():
                        call()
                r = measure(fwd, device, args.warmup, args.iters)
            else:
                model.train()
                model.enable_gradient_checkpointing()

                def step():
                    torch.nn.functional.mse_loss(call().float(), target).backward()
                    model.zero_grad(set_to_none=True)
                r = measure(step, device, args.warmup, args.iters)
            rows.append(("diffusers", mode, setting, r))
            del model
            _release_memory(device)
    return rows, outs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, nargs=3, default=[31, 22, 40], metavar=("F", "H", "W"),
                   help="post-patch token grid (default 31 x 22 x 40 = 27,280 tokens)")
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--recompute", nargs="*", default=["full", "selective", "ffn", "none"],
                   help="megawan train-step settings: none | full | selective | ffn, optionally :N blocks")
    p.add_argument("--residual-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="megawan's residual stream: float32 (the release's) and/or bfloat16 (DiTRuntime."
                        "residual_dtype, the faster option; rows marked +bf16-stream)")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model on CPU to check the script itself; prints no benchmark figures")
    args = p.parse_args(argv)

    if not torch.cuda.is_available() and not args.cpu_smoke:
        raise SystemExit("bench_dit_full_gpu.py: no CUDA device found; nothing was measured. Run it on a GPU "
                         "machine, or pass --cpu-smoke to check the script on a tiny model.")
    groups = parallel_state.get_groups()
    device = groups.device
    if args.cpu_smoke:
        cfg = WanDiTConfig.preset("tiny")
        args.grid, args.warmup, args.iters = [2, 2, 3], 1, 1
    else:
        cfg = WanDiTConfig.preset("wan2.2-ti2v-5b")
    grid = tuple(args.grid)
    tokens = grid[0] * grid[1] * grid[2]
    inputs = make_inputs(cfg, grid, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a benchmark)"
    print(f"device: {name}; torch {torch.__version__}; {cfg.num_layers} blocks, dim {cfg.dim}; grid "
          f"{'x'.join(map(str, grid))} = {tokens:,} tokens, batch 1, bf16 GEMMs, per-token t; "
          f"warmup {args.warmup}, iters {args.iters}\n", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None if args.no_diffusers else Path(tmp) / "diffusers"
        if ckpt is not None:
            ckpt.mkdir()
        rows, m_outs = run_megawan(cfg, groups, inputs, args, ckpt, device)
        d_outs = {}
        if ckpt is not None:
            d_rows, d_outs = run_diffusers(ckpt, inputs, args, device)
            rows += d_rows

    fwd_flops = cfg.num_layers * block_flops(tokens, cfg.dim, cfg.ffn_dim, cfg.text_len)["fwd"]
    base = {mode: r["s"] for who, mode, setting, r in rows
            if who == "diffusers" and setting == "full" and "s" in r}
    base_fwd = {mode: r["s"] for who, mode, setting, r in rows
                if who == "diffusers" and setting == "forward" and "s" in r}
    best = min(base.values()) if base else None
    best_fwd = min(base_fwd.values()) if base_fwd else None
    table = []
    for who, mode, setting, r in rows:
        if r.get("oom"):
            table.append([who, mode, setting, "OOM", "", "", ""])
            continue
        flops = fwd_flops * (1 if setting == "forward" else 3)
        ref = best_fwd if setting == "forward" else best
        table.append([who, mode, setting, f"{r['s']:.3f}", f"{flops / r['s'] / 1e12:.0f}",
                      f"{r['peak'] / 2**30:.1f}" if r["peak"] is not None else "n/a",
                      f"{ref / r['s']:.2f}x" if ref else "n/a"])
    print(format_table(table, ["model", "mode", "forward / train-step recompute", "s", "block TFLOP/s",
                               "peak GiB", "speed vs best diffusers"]))
    print("\nblock TFLOP/s = all blocks' GEMM + attention FLOPs (bench_dit_block_gpu.py; a train step = 3 x "
          "forward, recomputation not counted) / time. 'speed vs best diffusers' divides by diffusers' "
          "fastest (compiled when run) forward or train step.")
    for label, out in m_outs.items():
        mode = label.split("+")[0]
        if mode in d_outs:
            ref = d_outs[mode]
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"output difference, {label}, megawan vs diffusers (bf16 GEMMs both; diffusers' residual "
                  f"stream is bf16): rel. L2 {err:.3e}")
    if "eager" in m_outs and "compiled" in m_outs:
        a, b = m_outs["eager"], m_outs["compiled"]
        print(f"megawan compiled vs eager forward: rel. L2 {((b - a).norm() / a.norm()).item():.3e}")
    for label, out in m_outs.items():
        fp32_stream = m_outs.get(label.split("+")[0])
        if label.endswith(STREAM_LABEL) and fp32_stream is not None:
            err = ((out - fp32_stream).norm() / fp32_stream.norm()).item()
            print(f"megawan {label} vs the fp32 stream (the release's numerics): rel. L2 {err:.3e}")


if __name__ == "__main__":
    main()
