"""Parameter count and bytes per rank of Wan 2.2 TI2V-5B's DiT at TP = 1, 2, 4 against the full model.

Every rank builds the real ``WanDiT`` at full width (dim 3072, ffn 14336, 24 heads) with 1 and with 2
blocks (no weight init: counting only) and reads the parameters it holds. One block = the 2-block
model minus the 1-block one (checked against ``blocks.0``); the 30-block model's figures per rank are
(everything outside the blocks) + 30 x (one block). Building all 30 blocks is not needed: blocks are
identical, and the model cannot be built on the meta device (it moves itself to a real device).

Bytes are given three ways: all bf16, all fp32, and "as built" with ``DiTRuntime(dtype=bf16)``: the
attention/FFN GEMM weights and biases (megatron parallel linears) in bf16; embeddings, modulation, norms,
q/k-norm weights and the head in fp32, as megawan keeps them.

    python bench/bench_dit_params.py --tp 1 2 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402
from megawan.testing import run_distributed  # noqa: E402

REFERENCE_TOTAL = 4_999_787_712  # Wan 2.2 TI2V-5B release: block 163,656,704 x 30 + embeddings + head
REFERENCE_BLOCK = 163_656_704
REFERENCE_EMBED = 89_490_432
REFERENCE_HEAD = 596_160


def _group_of(name: str) -> str:
    if name.startswith("blocks."):
        return "block"
    if name.startswith("head."):
        return "head"
    return "embeddings"


def _census(model: torch.nn.Module) -> dict:
    """{group: {"params", "split", "bytes"}} of this rank's parameters (group: embeddings/block/head)."""
    out = {g: {"params": 0, "split": 0, "bytes": 0} for g in ("embeddings", "block", "head")}
    for name, p in model.named_parameters():
        d = out[_group_of(name)]
        d["params"] += p.numel()
        d["bytes"] += p.numel() * p.element_size()
        if getattr(p, "tensor_model_parallel", False):
            d["split"] += p.numel()
    return out


def rank_main(tps: list[int], num_layers: int) -> dict:
    results = {}
    for tp in tps:
        groups = parallel_state.initialize(tp, 1)
        per_layers = {}
        for n in (1, 2):
            cfg = WanDiTConfig(num_layers=n)
            model = WanDiT(cfg, groups, DiTRuntime(dtype=torch.bfloat16, linear_impl="local", init_weights=False))
            census = _census(model)
            block0 = sum(p.numel() for p in model.blocks[0].parameters())
            per_layers[n] = (census, block0)
            del model
        one, two = per_layers[1][0], per_layers[2][0]
        block = {k: two["block"][k] - one["block"][k] for k in one["block"]}
        assert block["params"] == per_layers[1][1] == one["block"]["params"], "blocks are not identical"
        results[tp] = {"embeddings": one["embeddings"], "head": one["head"], "block": block,
                       "num_layers": num_layers, "tp_rank": groups.tp_rank}
    return results


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--num-layers", type=int, default=30)
    args = p.parse_args(argv)
    world = max(args.tp)
    if any(world % t for t in args.tp):
        raise SystemExit(f"every TP size must divide the largest ({world}): {args.tp}")

    t0 = time.perf_counter()
    per_rank = run_distributed(rank_main, world, args.tp, args.num_layers, timeout_s=900)
    nl = args.num_layers
    rows, parts, full = [], [], None
    for tp in args.tp:
        figs = [r[tp] for r in per_rank]
        # ranks of one TP group hold the same counts (every split divides evenly); check it
        same = all(f["block"] == figs[0]["block"] and f["embeddings"] == figs[0]["embeddings"] for f in figs)
        f = figs[0]
        total = f["embeddings"]["params"] + f["head"]["params"] + nl * f["block"]["params"]
        split = f["embeddings"]["split"] + f["head"]["split"] + nl * f["block"]["split"]
        mixed = f["embeddings"]["bytes"] + f["head"]["bytes"] + nl * f["block"]["bytes"]
        if tp == 1:
            full = total
        rows.append([tp, f"{total:,}", f"{total / full:.4f}" if full else "-", f"{split:,}", f"{total - split:,}",
                     _gib(2 * total), _gib(4 * total), _gib(mixed), str(same)])
        parts.append([tp, f"{f['embeddings']['params']:,}", f"{f['block']['params']:,}",
                      f"{f['block']['split']:,}", f"{f['block']['params'] - f['block']['split']:,}",
                      f"{f['head']['params']:,}"])

    print(f"Wan 2.2 TI2V-5B DiT ({nl} blocks, dim 3072, ffn 14336, 24 heads): parameters per rank\n")
    print(format_table(rows, ["TP", "params/rank", "of full", "TP-split", "replicated", "bf16 GiB", "fp32 GiB",
                              "as built GiB", "same on all ranks"]))
    print("\nPer component, per rank (one block; embeddings = patch + text + time + time projection):\n")
    print(format_table(parts, ["TP", "embeddings", "one block", "block TP-split", "block replicated", "head"]))
    if 1 in args.tp:
        f = per_rank[0][1]
        checks = [("total", full, REFERENCE_TOTAL), ("one block", f["block"]["params"], REFERENCE_BLOCK),
                  ("embeddings", f["embeddings"]["params"], REFERENCE_EMBED), ("head", f["head"]["params"],
                                                                              REFERENCE_HEAD)]
        if nl != 30:
            checks = checks[1:]
        print("\nTP=1 against the release's counts:")
        for name, got, want in checks:
            print(f"  {name:<10} {got:>15,}  release {want:>15,}  {'OK' if got == want else 'MISMATCH'}")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
