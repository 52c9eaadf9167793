"""GPU: a full-width Wan 2.2 TI2V-5B training step, megawan beside diffusers' WanTransformer3DModel (one GPU).

Both models hold the same random weights (megawan's, copied key by key into diffusers' layout) and get the
same inputs: latents of 77 x 512 x 512 (20 x 32 x 32 = 5,120 tokens, the 1X set-up) or 121 x 704 x 1280
(31 x 44 x 80 = 27,280 tokens), per-token timesteps with latent frame 0 clean (TI2V), 512 text tokens, batch 1.
One step = forward, the flow-matching loss (MSE to noise - x0), backward with per-block activation
checkpointing (both models; 27,280 tokens do not fit without it), and an AdamW step on every parameter
(torch's foreach AdamW in each parameter's dtype at lr 0, so the weights stay equal between cases: the same
work for both; megawan's trainer uses
megatron's distributed optimizer with fp32 master weights instead, which needs more than one 80 GB GPU
for 5B parameters). bf16 GEMMs; megawan keeps embeddings / norms / modulation in fp32 as the release,
diffusers keeps its ``_keep_in_fp32_modules`` in fp32 as its from_pretrained does.

Reported: seconds per step (median of --repeats after a warm-up), tokens/s, model TFLOP/s and MFU from
``megawan.training.budget.dit_flops`` (3 x forward FLOPs; recomputation not counted) over --peak-tflops
(989: H100 SXM dense bf16), peak memory, and the relative difference of the two models' first velocities.

    python bench/bench_train_gpu.py [--cases 5120 27280] [--repeats 3] [--no-optimizer] [--compile] [--json F]
    python bench/bench_train_gpu.py --tiny        # CPU smoke test at tiny width (fp32): also checks that
                                                  # both models compute the same velocity and gradients
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table, write_rows_json  # noqa: E402
from megawan import parallel_state  # noqa: E402
from megawan.checkpoint.dit_io import iter_full_state  # noqa: E402
from megawan.checkpoint.dit_keys import official_keys, to_layout  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402
from megawan.training.budget import dit_flops  # noqa: E402

CASES = {5120: (20, 32, 32), 27280: (31, 44, 80)}
TINY_CASES = {12: (3, 4, 4), 80: (5, 8, 8)}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(step, repeats: int, dev) -> float:
    step()  # warm-up (kernels, allocator, optimizer state)
    out = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _inputs(cfg, grid, dev, dtype):
    f, h, w = grid
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, cfg.out_channels, f, h, w, generator=g)
    noise = torch.randn(1, cfg.out_channels, f, h, w, generator=g)
    per_frame = (h // 2) * (w // 2)
    t = torch.full((1, f * per_frame), 700.0)
    t[:, :per_frame] = 0.0  # frame 0 is the clean condition
    x_t = 0.7 * noise + 0.3 * x0
    x_t[:, :, :1] = x0[:, :, :1]
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    return x_t.to(dev), t.to(dev), text.to(dev, dtype), (noise - x0).to(dev)


def diffusers_twin(model: WanDiT, dtype: torch.dtype):
    """diffusers' WanTransformer3DModel with ``model``'s weights (full model: call on one rank)."""
    from diffusers import WanTransformer3DModel

    cfg = model.config
    ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
                                out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                                qk_norm="rms_norm_across_heads", eps=cfg.eps)
    ref.load_state_dict({to_layout(k, "diffusers"): t for k, t in iter_full_state(model)}, strict=True)
    ref.to(model.groups.device)
    keep = getattr(ref, "_keep_in_fp32_modules", None) or []
    for name, p in ref.named_parameters():  # parameter by parameter: Module.to(dtype) would cast them all
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(dtype)
    return ref


def _grads_by_release_key(model: WanDiT) -> dict:
    out = {}
    for name, p in model.named_parameters():
        keys = official_keys(name)
        for key, g in zip(keys, p.grad.chunk(len(keys), dim=0)):
            out[to_layout(key, "diffusers")] = g.float()
    return out


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_case(ours, theirs, cfg, grid, args, dev, dtype) -> dict:
    x_t, t, text, target = _inputs(cfg, grid, dev, dtype)
    tokens = t.shape[1]

    def ours_v():
        return ours(x_t, t, text)

    def theirs_v():
        return theirs(hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=text,
                      return_dict=False)[0]

    result = {"tokens": tokens}
    for name, model, forward in (("megawan", ours, ours_v), ("diffusers", theirs, theirs_v)):
        opt = None if args.no_optimizer else torch.optim.AdamW(model.parameters(), lr=0.0, foreach=True)

        def step():
            model.zero_grad(set_to_none=True)
            v = forward()
            loss = (v.float() - target).square().mean()
            loss.backward()
            if opt is not None:
                opt.step()
            return v

        with torch.no_grad():
            result[f"{name}_v"] = forward().float().cpu()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if args.tiny:  # gradients of one step (before any update) for the parity check
            model.zero_grad(set_to_none=True)
            (forward().float() - target).square().mean().backward()
            result[f"{name}_grads"] = (_grads_by_release_key(model) if model is ours else
                                       {k: p.grad.float() for k, p in model.named_parameters()})
        seconds = _time(step, args.repeats, dev)
        result[name] = seconds
        result[f"{name}_peak"] = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        del opt
    result["v_rel"] = _rel(result["megawan_v"], result["diffusers_v"])
    if args.tiny:
        g1, g2 = result["megawan_grads"], result["diffusers_grads"]
        result["grad_rel"] = max(_rel(g1[k], g2[k]) for k in g2 if g2[k].norm() > 0)
    return result


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, nargs="+", help="tokens per sample (default 5120 27280; --tiny 12 80)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-optimizer", action="store_true", help="time forward + backward only")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--tiny", action="store_true", help="tiny width, fp32, on CPU: a smoke test with parity checks")
    p.add_argument("--compile", action="store_true",
                   help="both models' blocks compiled (megawan compile_blocks, diffusers compile_repeated_blocks)")
    p.add_argument("--json", default=None, help="also write the table's rows to this JSON file")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_train_gpu.py needs a CUDA GPU (or --tiny for the CPU smoke test)")
    cases = TINY_CASES if args.tiny else CASES
    wanted = args.cases or list(cases)
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        sys.exit(f"unknown --cases {unknown}: choose from {sorted(cases)}")

    groups = parallel_state.get_groups()
    dev = groups.device
    cfg = WanDiTConfig.load("tiny") if args.tiny else WanDiTConfig()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    # compile_blocks explicit: both sides compiled (--compile) or both eager, never one of each
    rt = DiTRuntime(dtype=dtype, activation_checkpointing=True, linear_impl="local" if args.tiny else "auto",
                    compile_blocks=args.compile)
    ours = WanDiT(cfg, groups, rt, seed=0)  # the model's one (layout- and device-independent) initialisation
    theirs = diffusers_twin(ours, dtype)
    if not args.tiny:
        theirs.enable_gradient_checkpointing()
    if args.compile:
        theirs.compile_repeated_blocks()  # diffusers' regional compilation, as megawan compiles each block
    ours.train()
    theirs.train()

    results, rows = [], []
    for tokens in wanted:
        if args.compile:
            torch._dynamo.reset()  # each size gets the static graphs a run at that one size gets
        r = run_case(ours, theirs, cfg, cases[tokens], args, dev, dtype)
        results.append(r)
        flops = dit_flops(cfg, tokens, batch=1)
        for name in ("megawan", "diffusers"):
            tflops = flops / r[name] / 1e12
            rows.append([name, tokens, f"{r[name]:.3f}", f"{tokens / r[name]:,.0f}", f"{tflops:.1f}",
                         f"{tflops / args.peak_tflops:.1%}", f"{r[name + '_peak']:.1f}"])
        print(f"{tokens} tokens: diffusers / megawan time {r['diffusers'] / r['megawan']:.2f}, "
              f"velocity rel diff {r['v_rel']:.2e}" + (f", max grad rel diff {r['grad_rel']:.2e}" if args.tiny else ""),
              flush=True)
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (smoke test, timings meaningless)"
    print(f"{device}; Wan DiT dim {cfg.dim} x {cfg.num_layers} layers, {dtype}, batch 1, activation checkpointing, "
          f"{'no optimizer' if args.no_optimizer else 'AdamW'}; median of {args.repeats}; MFU over "
          f"{args.peak_tflops:g} TFLOP/s")
    header = ["model", "tokens", "s/step", "tokens/s", "TFLOP/s", "MFU", "peak GiB"]
    print(format_table(rows, header, left_columns=1))
    write_rows_json(args.json, header, rows, device=device, compiled=args.compile,
                    v_rel={r["tokens"]: r["v_rel"] for r in results})
    return results


if __name__ == "__main__":
    main()
