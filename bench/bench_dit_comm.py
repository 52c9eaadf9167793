"""Bytes per rank per DiT block, by collective type, counted from the collective calls themselves.

Each layout runs the real ``WanDiT`` (random weights, ``linear_impl='local'``) on spawned gloo ranks with
every torch.distributed collective wrapped (bench/_collective_counter.py). The model is run twice, with
1 and with 2 blocks; one block's figures are the difference, so the per-forward collectives outside the
blocks (token scatter, text-context entry, head gather) cancel. Phases:

* fwd: the forward pass; bwd: ``loss.backward()``; grad-sync: ``reduce_model_parallel_grads`` (the
  TP all-reduce of sequence-parallel params' grads and the CP all-reduce of every grad; in training the
  latter is part of megatron DDP's data-parallel reduction).

Bytes per rank ("wire"): bytes this rank sends with a bandwidth-optimal algorithm: all-gather (n-1) x
its input, reduce-scatter (n-1) x its output, all-reduce 2 (n-1)/n x the tensor, all-to-all (n-1)/n x the
input. "buffer" is the full tensor the collective works on (gathered output, reduce-scatter input,
all-reduce tensor, all-to-all input). The analytic minimum (Megatron TP + SP, Ulysses CP, see the
DiT dataflow reference) uses the same wire definition; for one block and one forward with
Lc = padded tokens / cp, B = batch, D = dim, s = bytes of the compute dtype, Lt = 512 text tokens:

* SP on: 3 all-gathers + 3 reduce-scatters of Lc x B x D, each (t-1)/t x Lc B D s on the wire;
  SP off: 3 all-reduces of Lc x B x D;
* q/k norms: all-reduces of the fp32 sums of squares [Lc, B, 1] (self q, self k, cross q), [Lt, B, 1]
  (cross k): 2 (t-1)/t x 4 B (3 Lc + Lt) bytes, independent of D;
* Ulysses: 4 all-to-alls (q, k, v, out) of Lc x B x D/t, each (c-1)/c x Lc B D/t s;
* backward: the same collectives with all-gather and reduce-scatter swapped, plus, under SP, the
  Megatron re-gather: each of the 3 column-parallel entries (fused q/k/v, cross-attention q, fc1)
  keeps only its local token shard for backward and all-gathers it again there (3 more all-gathers
  of Lc x B x D: memory traded for bytes, as Megatron does).

    python bench/bench_dit_comm.py                    # TP2xCP2 (SP), TP4 (SP), TP4 (no SP); dim 3072
    python bench/bench_dit_comm.py --layouts 1x4 2x2:nosp --qk-scan ''   # pure Ulysses, TP2xCP2 without SP
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._collective_counter import CollectiveCounter  # noqa: E402
from bench._table import format_table as _format_table  # noqa: E402
from megawan import parallel_state  # noqa: E402
from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402
from megawan.parallel_state.grads import reduce_model_parallel_grads  # noqa: E402
from megawan.testing import run_distributed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PHASES = ("fwd", "bwd", "grad-sync")
TYPE_ORDER = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single")


def _parse_layout(text: str) -> tuple[int, int, bool]:
    """'2x2' / '4x1:nosp' -> (tp, cp, sequence_parallel)."""
    shape, _, flag = text.partition(":")
    tp, cp = (int(v) for v in shape.split("x"))
    return tp, cp, flag != "nosp"


def _layout_name(tp, cp, sp) -> str:
    return f"TP{tp}xCP{cp}" + ("" if tp == 1 else (" SP" if sp else " noSP"))


def _count_case(groups, case: dict, num_layers: int) -> dict:
    cfg = WanDiTConfig(dim=case["dim"], ffn_dim=case["ffn_dim"], num_heads=case["heads"], num_layers=num_layers)
    torch.manual_seed(0)
    # Byte counts do not depend on values: skip megatron's (slow, CPU) init and fill every parameter
    # with a small constant instead.
    model = WanDiT(cfg, groups, DiTRuntime(dtype=DTYPES[case["dtype"]], sequence_parallel=case["sp"],
                                           linear_impl="local", attention_backend="torch", init_weights=False))
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(0.01)
    model.train()
    f, h, w = case["grid"]
    b = case["batch"]
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(b, cfg.in_channels, f, 2 * h, 2 * w, generator=g)
    timestep = torch.full((b, f * h * w), 500.0)
    timestep[:, : h * w] = 0.0  # TI2V: latent frame 0 clean
    text = torch.randn(b, 16, cfg.text_dim, generator=g)
    labels = {"tp": groups.tp_group, "cp": groups.cp_group}
    with CollectiveCounter(labels) as counter:
        counter.phase = "fwd"
        out = model(latents, timestep, text)
        counter.phase = "bwd"
        (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
        counter.phase = "grad-sync"
        reduce_model_parallel_grads(model, groups)
    padded = model._shards(f * h * w).padded_tokens
    return {"stats": counter.snapshot(), "padded_tokens": padded}


def rank_main(cases: list[dict]) -> list[dict]:
    # torch 2.13 marks all_gather_into_tensor / reduce_scatter_tensor (what megatron calls) deprecated.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\..* is deprecated", category=FutureWarning)
    results = []
    for case in cases:
        groups = parallel_state.initialize(case["tp"], case["cp"])
        t0 = time.perf_counter()
        one = _count_case(groups, case, 1)
        two = _count_case(groups, case, 2)
        results.append({"one": one, "two": two, "seconds": time.perf_counter() - t0})
    return results


# ---- analysis -------------------------------------------------------------------------------------


def block_difference(one: dict, two: dict) -> dict:
    """{phase: {key: (calls, buffer, wire)}} of one block = 2-block run minus 1-block run."""
    out = {}
    for phase in PHASES:
        a, b = one["stats"].get(phase, {}), two["stats"].get(phase, {})
        diff = {}
        for key in set(a) | set(b):
            va, vb = a.get(key, (0, 0, 0)), b.get(key, (0, 0, 0))
            d = tuple(y - x for x, y in zip(va, vb))
            if any(d):
                diff[key] = d
        out[phase] = diff
    return out


def analytic(tp, cp, sp, padded_tokens, batch, dim, elem, text_len=512) -> dict:
    """{phase: {key: (calls, wire bytes)}} of one block (fwd and bwd) under Megatron TP(+SP) and Ulysses."""
    lc = padded_tokens // cp
    act = lc * batch * dim * elem
    fwd = {}
    if tp > 1:
        if sp:
            fwd[("all_gather_into_tensor", "tp", "")] = (3, 3 * act * (tp - 1) / tp)
            fwd[("reduce_scatter_tensor", "tp", "")] = (3, 3 * act * (tp - 1) / tp)
        else:
            fwd[("all_reduce", "tp", "")] = (3, 3 * 2 * act * (tp - 1) / tp)
        fwd[("all_reduce", "tp", "qk-norm sum-sq")] = (4, 2 * (tp - 1) / tp * 4 * batch * (3 * lc + text_len))
    if cp > 1:
        fwd[("all_to_all_single", "cp", "")] = (4, 4 * act / tp * (cp - 1) / cp)
    bwd = dict(fwd)
    if tp > 1 and sp:  # the column layers re-gather their saved local input shard
        bwd[("all_gather_into_tensor", "tp", "")] = (6, 6 * act * (tp - 1) / tp)
    return {"fwd": fwd, "bwd": bwd}


def _sort_key(key):
    kind, group, tag = key
    return (TYPE_ORDER.index(kind) if kind in TYPE_ORDER else 99, group, tag)


def _fmt_bytes(n: float) -> str:
    return f"{n:,.0f}"


def format_table(rows, header) -> str:
    return _format_table(rows, header, left_columns=4)


def report(cases, results, scale_tokens: int) -> str:
    out = []
    header = ["case", "phase", "collective", "group", "calls", "wire B/rank", "analytic", "meas/anal",
              "buffer B"]
    rows = []
    for i, (case, per_rank) in enumerate(zip(cases, results)):
        tp, cp, sp = case["tp"], case["cp"], case["sp"]
        diffs = [block_difference(r["one"], r["two"]) for r in per_rank]
        same = all(d == diffs[0] for d in diffs)
        diff = diffs[0]
        padded = per_rank[0]["one"]["padded_tokens"]
        elem = torch.empty(0, dtype=DTYPES[case["dtype"]]).element_size()
        ana = analytic(tp, cp, sp, padded, case["batch"], case["dim"], elem)
        name = f"{i + 1}: {_layout_name(tp, cp, sp)}"
        case["label"] = (f"{name}: dim {case['dim']}, ffn {case['ffn_dim']}, {case['heads']} heads, grid "
                         f"{'x'.join(map(str, case['grid']))} = {padded} tokens, batch {case['batch']}, "
                         f"{case['dtype']}; identical on all {tp * cp} ranks: {same}; "
                         f"{max(r['seconds'] for r in per_rank):.0f} s")
        for phase in PHASES:
            keys = sorted(set(diff[phase]) | set(ana.get(phase, {})), key=_sort_key)
            tot_m = tot_a = 0.0
            for key in keys:
                calls, buffer, wire = diff[phase].get(key, (0, 0, 0))
                a_calls, a_wire = ana.get(phase, {}).get(key, (None, None))
                tot_m += wire
                tot_a += a_wire or 0
                kind, group, tag = key
                ratio = f"{wire / a_wire:.3f}" if a_wire else ("-" if a_calls is None else "n/a")
                rows.append([name, phase, kind + (f" ({tag})" if tag else ""), group,
                             f"{calls}" + (f" (an. {a_calls})" if a_calls is not None and a_calls != calls else ""),
                             _fmt_bytes(wire), "-" if a_wire is None else _fmt_bytes(a_wire), ratio,
                             _fmt_bytes(buffer)])
            if phase != "grad-sync" and keys:
                rows.append([name, phase, "TOTAL", "", "", _fmt_bytes(tot_m), _fmt_bytes(tot_a),
                             f"{tot_m / tot_a:.3f}" if tot_a else "-", ""])
    outside_rows = []
    for i, (case, per_rank) in enumerate(zip(cases, results)):
        one = per_rank[0]["one"]["stats"]
        diff = block_difference(per_rank[0]["one"], per_rank[0]["two"])
        for phase in ("fwd", "bwd"):
            for key in sorted(one.get(phase, {}), key=_sort_key):
                calls, buffer, wire = (a - b for a, b in zip(one[phase][key], diff[phase].get(key, (0, 0, 0))))
                if calls:
                    outside_rows.append([f"{i + 1}: {_layout_name(case['tp'], case['cp'], case['sp'])}", phase,
                                         key[0] + (f" ({key[2]})" if key[2] else ""), key[1], str(calls),
                                         _fmt_bytes(wire), _fmt_bytes(buffer)])
    qk_rows = []
    for i, (case, per_rank) in enumerate(zip(cases, results)):
        fwd = block_difference(per_rank[0]["one"], per_rank[0]["two"])["fwd"]
        lc = per_rank[0]["one"]["padded_tokens"] // case["cp"]
        qk = sum(v[2] for k, v in fwd.items() if k[2])
        act = sum(v[2] for k, v in fwd.items() if k[0] in TYPE_ORDER[:2] or (k[0] == "all_reduce" and not k[2]))
        if qk:
            qk_rows.append([f"{i + 1}: {_layout_name(case['tp'], case['cp'], case['sp'])}",
                            str(case["dim"]), str(lc),
                            _fmt_bytes(qk), f"{qk / (3 * lc + 512):.2f}", _fmt_bytes(act),
                            f"{act / (lc * case['dim']):.2f}"])
    out.append("Cases:")
    out += [f"  {c['label']}" for c in cases]
    out.append("")
    out.append("One DiT block, bytes per rank (wire = sent with a bandwidth-optimal algorithm; see the docstring):")
    out.append(format_table(rows, header))
    if outside_rows:
        out.append("")
        out.append("Outside the blocks, once per model forward / backward (1-block run minus one block): token "
                   "scatter, text context entry, head gather:")
        out.append(format_table(outside_rows, ["case", "phase", "collective", "group", "calls", "wire B/rank",
                                               "buffer B"]))
    if qk_rows:
        out.append("")
        out.append("q/k-norm all-reduce vs activation collectives, one block forward (Lc = tokens per CP rank; "
                   "the q/k sums of squares cover 3 Lc video + 512 text token rows):")
        out.append(format_table(qk_rows, ["case", "dim", "Lc", "qk sum-sq B", "B / (3Lc+512)", "AG+RS (or AR) B",
                                          "B / (Lc*dim)"]))
    if scale_tokens:
        out.append("")
        out.append(f"Analytic minimum for one block at {scale_tokens:,} tokens (same formulas, batch 1, bf16), "
                   "MiB per rank:")
        seen, srows = set(), []
        for case in cases:
            key = (case["tp"], case["cp"], case["sp"])
            if key in seen:
                continue
            seen.add(key)
            unit = case["tp"] * case["cp"]
            padded = -(-scale_tokens // unit) * unit
            ana = analytic(*key, padded, 1, 3072, 2)
            fwd = sum(v[1] for v in ana["fwd"].values())
            bwd = sum(v[1] for v in ana["bwd"].values())
            qk = sum(v[1] for k, v in ana["fwd"].items() if k[2])
            srows.append([_layout_name(*key), f"{fwd / 2**20:,.2f}", f"{(fwd + bwd) / 2**20:,.2f}",
                          f"{qk / 2**20:.4f}"])
        out.append(format_table(srows, ["layout", "fwd MiB", "fwd+bwd MiB", "of which q/k-norm (fwd) MiB"]))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=["2x2", "4x1", "4x1:nosp"],
                   help="TPxCP[:nosp] layouts (world size = TP*CP ranks each)")
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--ffn-dim", type=int, default=14336)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--grid", default="1x8x8", help="post-patch token grid FxHxW (tokens = F*H*W)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--qk-scan", default="2x2", help="layout for the q/k-norm scaling scan ('' to skip): "
                   "the same layout at half the width and at twice the tokens")
    p.add_argument("--scale-tokens", type=int, default=27280, help="tokens for the analytic summary (0: skip)")
    args = p.parse_args(argv)

    grid = tuple(int(v) for v in args.grid.split("x"))
    base = {"dim": args.dim, "ffn_dim": args.ffn_dim, "heads": args.heads, "grid": grid, "batch": args.batch,
            "dtype": args.dtype}
    cases = [dict(base, tp=tp, cp=cp, sp=sp) for tp, cp, sp in map(_parse_layout, args.layouts)]
    if args.qk_scan:
        tp, cp, sp = _parse_layout(args.qk_scan)
        cases.append(dict(base, tp=tp, cp=cp, sp=sp, dim=args.dim // 2, ffn_dim=args.ffn_dim // 2))
        cases.append(dict(base, tp=tp, cp=cp, sp=sp, grid=(grid[0], grid[1], 2 * grid[2])))
    by_world: dict[int, list[int]] = {}
    for i, c in enumerate(cases):
        by_world.setdefault(c["tp"] * c["cp"], []).append(i)
    results: list = [None] * len(cases)
    t0 = time.perf_counter()
    for world, idx in by_world.items():
        per_rank = run_distributed(rank_main, world, [cases[i] for i in idx], timeout_s=900)
        for j, i in enumerate(idx):
            results[i] = [r[j] for r in per_rank]
    print(report(cases, results, args.scale_tokens))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
