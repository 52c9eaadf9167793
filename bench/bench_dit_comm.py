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
all-reduce tensor, all-to-all input). The analytic minimum (``megawan.plan.comm.block_bytes``: Megatron TP + SP,
Ulysses / ring / hybrid CP, see the DiT dataflow reference and docs/dit.md) uses the same wire definition; for one
block and one forward with
Lc = padded tokens / cp, B = batch, D = dim, s = bytes of the compute dtype, Lt = 512 text tokens:

* SP on: 3 all-gathers + 3 reduce-scatters of Lc x B x D, each (t-1)/t x Lc B D s on the wire;
  SP off: 3 all-reduces of Lc x B x D;
* q/k norms: all-reduces of the fp32 sums of squares [Lc, B, 1] (self q, self k, cross q), [Lt, B, 1]
  (cross k): 2 (t-1)/t x 4 B (3 Lc + Lt) bytes, independent of D;
* context parallelism of u x r ranks (``cp_impl``: Ulysses u = c, ring u = 1, hybrid u = ulysses_size):
  Ulysses part, 4 all-to-alls (q, k, v, out) of Lc x B x D/t, each (u-1)/u x Lc B D/t s; ring part, a
  batch_isend_irecv per ring step sending one key/value block (2 Lc B D/t s): r-1 in forward, and in
  backward r-1 again plus r fp32 key/value-gradient blocks (2 Lc B D/t x 4 bytes);
* backward: the same collectives with all-gather and reduce-scatter swapped, plus, under SP, the
  Megatron re-gather: each of the 3 column-parallel entries (fused q/k/v, cross-attention q, fc1)
  keeps only its local token shard for backward and all-gathers it again there (3 more all-gathers
  of Lc x B x D: memory traded for bytes, as Megatron does).

    python bench/bench_dit_comm.py   # TP2xCP2 (SP), TP4 (SP / no SP), CP4 Ulysses / ring, TP2xCP2 ring,
                                     # CP4 hybrid 2x2; dim 3072; analytic table at 27,280 and 220,000 tokens
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
# the analytic figures live with the layout planner (megawan/plan/comm.py): one formula for the bench, the
# tests that count bytes on gloo and `python -m megawan.plan`
from megawan.plan.comm import block_bytes as analytic  # noqa: E402
from megawan.testing import run_distributed  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PHASES = ("fwd", "bwd", "grad-sync")
TYPE_ORDER = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_to_all_single",
              "batch_isend_irecv")


def _parse_layout(text: str) -> tuple[int, int, bool, str, int | None]:
    """'2x2' / '4x1:nosp' / '1x4:ring' / '2x4:hybrid2' (Ulysses groups of 2) / '2x2:nosp:ring' ->
    (tp, cp, sequence_parallel, cp_impl, ulysses_size)."""
    shape, *flags = text.split(":")
    tp, cp = (int(v) for v in shape.split("x"))
    impl, ulysses_size = "ulysses", None
    for flag in flags:
        if flag == "ring":
            impl = "ring"
        elif flag.startswith("hybrid"):
            impl, ulysses_size = "hybrid", int(flag[len("hybrid"):])
        elif flag != "nosp":
            raise ValueError(f"unknown layout flag {flag!r} in {text!r} (nosp, ring, hybridU)")
    return tp, cp, "nosp" not in flags, impl, ulysses_size


def _layout_name(tp, cp, sp, impl="ulysses", ulysses_size=None) -> str:
    cp_part = "" if cp == 1 else {"ulysses": " Ulysses", "ring": " ring",
                                  "hybrid": f" hybrid {ulysses_size}x{cp // (ulysses_size or 1)}"}[impl]
    return f"TP{tp}xCP{cp}" + ("" if tp == 1 else (" SP" if sp else " noSP")) + cp_part


def _layout(case: dict) -> tuple:
    return case["tp"], case["cp"], case["sp"], case.get("cp_impl", "ulysses"), case.get("ulysses_size")


def _count_case(groups, case: dict, num_layers: int) -> dict:
    cfg = WanDiTConfig(dim=case["dim"], ffn_dim=case["ffn_dim"], num_heads=case["heads"], num_layers=num_layers)
    torch.manual_seed(0)
    # Byte counts do not depend on values: skip megatron's (slow, CPU) init and fill every parameter
    # with a small constant instead.
    model = WanDiT(cfg, groups, DiTRuntime(dtype=DTYPES[case["dtype"]], sequence_parallel=case["sp"],
                                           linear_impl="local", attention_backend="torch", init_weights=False,
                                           cp_impl=case.get("cp_impl", "ulysses"),
                                           ulysses_size=case.get("ulysses_size")))
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
    cpg = model.backend.context_parallel
    if cpg.ulysses > 1 and cpg.ring > 1:  # hybrid: its two sub-groups of the CP group
        labels.update(ulysses=cpg.ulysses_group, ring=cpg.ring_group)
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
        groups = parallel_state.initialize(case["tp"], case["cp"], cp_impl=case.get("cp_impl", "ulysses"),
                                           ulysses_size=case.get("ulysses_size"))
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


def _sort_key(key):
    kind, group, tag = key
    return (TYPE_ORDER.index(kind) if kind in TYPE_ORDER else 99, group, tag)


def _fmt_bytes(n: float) -> str:
    return f"{n:,.0f}"


def format_table(rows, header) -> str:
    return _format_table(rows, header, left_columns=4)


def scale_table(layouts, token_counts, dim: int = 3072, elem: int = 2) -> str:
    """The analytic bytes of one block (batch 1, bf16, the 5B's width) per layout and token count, split into
    the TP collectives (all-gathers, reduce-scatters, q/k-norm all-reduces), the Ulysses all-to-alls and
    the ring's point-to-point sends: where each runs (inside a node or across nodes) decides which wins."""
    rows, seen = [], set()
    for tokens in token_counts:
        for layout in layouts:
            if (tokens, layout) in seen:
                continue
            seen.add((tokens, layout))
            tp, cp, sp, impl, u = layout
            unit = tp * cp if sp else cp
            padded = -(-tokens // unit) * unit
            ana = analytic(tp, cp, sp, padded, 1, dim, elem, cp_impl=impl, ulysses_size=u)
            both = [(k, v) for phase in ("fwd", "bwd") for k, v in ana[phase].items()]
            part = {kind: sum(v[1] for k, v in both if k[0] == kind) / 2**20
                    for kind in ("all_to_all_single", "batch_isend_irecv")}
            total = sum(v[1] for _, v in both) / 2**20
            fwd = sum(v[1] for v in ana["fwd"].values()) / 2**20
            rows.append([f"{tokens:,}", _layout_name(*layout), f"{fwd:,.1f}", f"{total:,.1f}",
                         f"{total - part['all_to_all_single'] - part['batch_isend_irecv']:,.1f}",
                         f"{part['all_to_all_single']:,.1f}", f"{part['batch_isend_irecv']:,.1f}"])
    return ("Analytic bytes for one block, batch 1, bf16, dim 3072 (the 5B), MiB per rank:\n"
            + format_table(rows, ["tokens", "layout", "fwd", "fwd+bwd", "of which TP", "of which all-to-all",
                                  "of which ring P2P"]))


def report(cases, results, scale_tokens: list[int], scale_layouts: list | None = None) -> str:
    out = []
    header = ["case", "phase", "collective", "group", "calls", "wire B/rank", "analytic", "meas/anal",
              "buffer B"]
    rows = []
    for i, (case, per_rank) in enumerate(zip(cases, results)):
        tp, cp, sp, impl, u = _layout(case)
        diffs = [block_difference(r["one"], r["two"]) for r in per_rank]
        same = all(d == diffs[0] for d in diffs)
        diff = diffs[0]
        padded = per_rank[0]["one"]["padded_tokens"]
        elem = torch.empty(0, dtype=DTYPES[case["dtype"]]).element_size()
        ana = analytic(tp, cp, sp, padded, case["batch"], case["dim"], elem, cp_impl=impl, ulysses_size=u)
        name = f"{i + 1}: {_layout_name(*_layout(case))}"
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
                    outside_rows.append([f"{i + 1}: {_layout_name(*_layout(case))}", phase,
                                         key[0] + (f" ({key[2]})" if key[2] else ""), key[1], str(calls),
                                         _fmt_bytes(wire), _fmt_bytes(buffer)])
    qk_rows = []
    for i, (case, per_rank) in enumerate(zip(cases, results)):
        fwd = block_difference(per_rank[0]["one"], per_rank[0]["two"])["fwd"]
        lc = per_rank[0]["one"]["padded_tokens"] // case["cp"]
        qk = sum(v[2] for k, v in fwd.items() if k[2])
        act = sum(v[2] for k, v in fwd.items() if k[0] in TYPE_ORDER[:2] or (k[0] == "all_reduce" and not k[2]))
        if qk:
            qk_rows.append([f"{i + 1}: {_layout_name(*_layout(case))}",
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
        out.append(scale_table(scale_layouts or [_layout(c) for c in cases], scale_tokens))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", nargs="+", default=["2x2", "4x1", "4x1:nosp", "1x4", "1x4:ring", "2x2:ring",
                                                    "1x4:hybrid2"],
                   help="TPxCP[:nosp][:ring|:hybridU] layouts (world size = TP*CP ranks each); CP is Ulysses "
                        "unless :ring or :hybridU (Ulysses groups of U, ring across them)")
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--ffn-dim", type=int, default=14336)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--grid", default="1x8x8", help="post-patch token grid FxHxW (tokens = F*H*W)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--qk-scan", default="2x2", help="layout for the q/k-norm scaling scan ('' to skip): "
                   "the same layout at half the width and at twice the tokens")
    p.add_argument("--scale-tokens", type=int, nargs="*", default=[27280, 220000],
                   help="token counts for the analytic summary (none: skip)")
    p.add_argument("--scale-layouts", nargs="*", default=["2x4", "2x4:ring", "2x4:hybrid2", "2x12", "2x16:ring",
                                                          "2x16:hybrid4", "2x32:ring", "2x32:hybrid4"],
                   help="layouts of the analytic summary (default: 8 and 24-64 GPUs at TP2)")
    args = p.parse_args(argv)

    grid = tuple(int(v) for v in args.grid.split("x"))
    base = {"dim": args.dim, "ffn_dim": args.ffn_dim, "heads": args.heads, "grid": grid, "batch": args.batch,
            "dtype": args.dtype}
    keys = ("tp", "cp", "sp", "cp_impl", "ulysses_size")
    cases = [dict(base, **dict(zip(keys, layout))) for layout in map(_parse_layout, args.layouts)]
    if args.qk_scan:
        layout = dict(zip(keys, _parse_layout(args.qk_scan)))
        cases.append(dict(base, **layout, dim=args.dim // 2, ffn_dim=args.ffn_dim // 2))
        cases.append(dict(base, **layout, grid=(grid[0], grid[1], 2 * grid[2])))
    by_world: dict[int, list[int]] = {}
    for i, c in enumerate(cases):
        by_world.setdefault(c["tp"] * c["cp"], []).append(i)
    results: list = [None] * len(cases)
    t0 = time.perf_counter()
    for world, idx in by_world.items():
        per_rank = run_distributed(rank_main, world, [cases[i] for i in idx], timeout_s=900)
        for j, i in enumerate(idx):
            results[i] = [r[j] for r in per_rank]
    print(report(cases, results, args.scale_tokens, [_parse_layout(t) for t in args.scale_layouts]))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
