"""Rank functions for tests/test_dit_speed.py (spawned by megawan.testing.run_distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.models.dit import DiTRuntime, WanDiT
from tests.dit_fixtures import TINY, make_case, rel_err


def _run(model, case, weight):
    x = case[0].clone().requires_grad_(True)
    out = model(x, case[1], case[2])
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def compiled_vs_eager(tp: int, cp: int, recompute: str | None = None, sequence_parallel: bool = True,
                      fp8: str = "off"):
    """Same weights, eager and with compiled blocks: forward and every local grad; graph-break report."""
    import torch._dynamo

    groups = parallel_state.initialize(tp, cp)
    case = make_case(3, 6, 6, per_token=True)  # 27 tokens: padded at every tp*cp > 1
    weight = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(5))
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        rt = DiTRuntime(linear_impl="local", compile_blocks=compiled, activation_checkpointing=recompute is not None,
                        recompute_granularity=recompute or "full", sequence_parallel=sequence_parallel, fp8=fp8)
        model = WanDiT(TINY, groups, rt).train()
        torch._dynamo.utils.counters.clear()
        _run(model, case, weight)  # compiles (tracing calls the ops too); then the measured run
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results[compiled] = _run(model, case, weight)
        # attention-core kernel calls in forward + backward (recomputed ones included; not its backward)
        attention_calls = sum(e.name.startswith("aten::_scaled_dot_product") and "backward" not in e.name
                              for e in prof.events())
        breaks = {reason.split("\n")[0]: n for reason, n in torch._dynamo.utils.counters["graph_break"].items()}
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (out_e, xg_e, g_e), (out_c, xg_c, g_c) = results[False], results[True]
    errs = {"out": rel_err(out_c, out_e), "x.grad": rel_err(xg_c, xg_e)}
    errs.update({n: rel_err(g_c[n], g) for n, g in g_e.items()})
    return {"errs": errs, "graph_breaks": breaks, "unique_graphs": graphs, "rank": dist.get_rank(),
            "attention_calls": attention_calls}


def recompute_vs_none(tp: int, cp: int, granularities):
    """Eager, same weights: each recomputation granularity's output and local grads vs none."""
    groups = parallel_state.initialize(tp, cp)
    case = make_case(3, 6, 6, per_token=True)
    weight = torch.randn(case[0].shape, generator=torch.Generator().manual_seed(5))
    runs = {}
    for g in [None, *granularities]:
        torch.manual_seed(0)
        rt = DiTRuntime(linear_impl="local", compile_blocks=False, activation_checkpointing=g is not None,
                        recompute_granularity=g or "full")
        runs[g] = _run(WanDiT(TINY, groups, rt).train(), case, weight)
    out0, xg0, g0 = runs[None]
    return {g: max([rel_err(o, out0), rel_err(xg, xg0)] + [rel_err(gr[n], g0[n]) for n in g0])
            for g, (o, xg, gr) in runs.items() if g is not None}
