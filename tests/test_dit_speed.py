"""The speed paths of the DiT (issue 13) give the numbers of the plain paths.

* every fused element-wise function equals its unfused reference, eager and compiled (CPU inductor),
  forward and backward;
* the compiled block equals the eager block within fp32 rounding, forward and every gradient, at
  TP1, TP2 x CP2 (SP on), TP2 (SP off) and CP2, with and without recomputation, as one graph with
  no graph break (the collectives are traced);
* each recomputation granularity gives the gradients of no recomputation, and keeps what it says
  (measured as the bytes the forward leaves allocated, with torch's profiler);
* the attention kernel is an explicit, logged choice.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from megawan.layers import fused
from megawan.layers.attention_kernels import resolve_backend
from megawan.layers.rope import rope_tables
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.testing import run_distributed
from tests import _speed_workers as workers
from tests.dit_fixtures import TINY, make_case, rel_err

# fp32 paths that only reorder or fuse fp32 ops (inductor, addcmul's FMA): a few ulps per element.
FP32_TOL = 1e-5
# Compiled vs eager: inductor fuses and reorders reductions, so a gradient summed over many rows
# (q/k-norm weights of the cross-attention: 2 x 512 text rows, with cancellation) moves by ~1e-5
# relative (measured 1.3e-5 at most); outputs and the other gradients stay within FP32_TOL.
COMPILED_GRAD_TOL = 5e-5
# bf16 outputs: the fused RoPE path rounds to bf16 once where the unfused chain rounds twice, so the
# two differ by up to one bf16 ulp (2^-8 relative) on some elements.
BF16_TOL = 8e-3


# ---- fused functions -------------------------------------------------------------------------------

def _fused_cases(dtype):
    g = torch.Generator().manual_seed(0)
    s, b, heads, d = 10, 2, 4, 12
    dim = heads * d

    def r(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(True)

    cos, sin = rope_tables(d, (2, 1, 5), 0, s, s)
    return {
        "modulated_layer_norm": (fused.modulated_layer_norm, fused.modulated_layer_norm_reference,
                                 (r(s, b, dim), r(s, b, dim), r(s, b, dim), 1e-6, dtype)),
        "gated_residual": (fused.gated_residual, fused.gated_residual_reference,
                           (r(s, b, dim), r(s, b, dim, dt=dtype), r(1, b, dim))),
        # the residual stream in the GEMM dtype (DiTRuntime.residual_dtype): the output keeps its dtype
        "gated_residual, stream in dtype": (fused.gated_residual, fused.gated_residual_reference,
                                            (r(s, b, dim, dt=dtype), r(s, b, dim, dt=dtype), r(1, b, dim))),
        "rms_norm_rope": (fused.rms_norm_rope, fused.rms_norm_rope_reference,
                          (r(s, b, dim, dt=dtype), (r(s, b, 1).detach().abs() * dim).requires_grad_(True),
                           r(dim), dim, 1e-6, cos, sin, heads)),
    }


def _value_and_grads(fn, args):
    args = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.requires_grad else a
            for a in args]
    out = fn(*args)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weight).sum().backward()
    return out, [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["modulated_layer_norm", "gated_residual", "gated_residual, stream in dtype",
                                  "rms_norm_rope"])
def test_fused_function_equals_reference_eager_and_compiled(name, dtype):
    fn, ref_fn, args = _fused_cases(dtype)[name]
    ref_out, ref_grads = _value_and_grads(ref_fn, args)
    if name == "gated_residual, stream in dtype":
        assert ref_out.dtype == dtype
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for impl in (fn, torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)):
        out, grads = _value_and_grads(impl, args)
        assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
        assert rel_err(out, ref_out) <= tol, (name, rel_err(out, ref_out))
        for g, rg in zip(grads, ref_grads, strict=True):
            assert rel_err(g, rg) <= tol, (name, rel_err(g, rg))


def test_fused_functions_run_plain_on_cpu():
    x = torch.randn(2, 3)
    assert fused.maybe_compiled(fused.gated_residual, x) is fused.gated_residual


# ---- compiled blocks ---------------------------------------------------------------------------

def _check_compiled(result):
    assert result["errs"]["out"] <= FP32_TOL, result["errs"]["out"]
    bad = {k: e for k, e in result["errs"].items() if not e <= COMPILED_GRAD_TOL}
    assert not bad, (result["rank"], bad)


def test_compiled_blocks_equal_eager_single_process():
    """TP1: the whole block is one graph (no graph break), forward and backward equal eager."""
    result = run_distributed(workers.compiled_vs_eager, 1, 1, 1)[0]
    _check_compiled(result)
    assert result["graph_breaks"] == {}, result["graph_breaks"]


@pytest.mark.parametrize("tp, cp, sp, recompute, fp8", [
    (2, 2, True, None, "off"), (2, 2, True, "selective", "off"), (2, 1, False, "full", "off"),
    (1, 2, False, "ffn", "off"), (2, 2, True, "selective", "native-rowwise")])
def test_compiled_blocks_equal_eager_in_parallel_layouts(tp, cp, sp, recompute, fp8):
    """Every rank's output and local grads equal eager (27 tokens: padded), and the block is one graph
    with no graph break: the TP linears' all-gathers / reduce-scatters / all-reduces, the Ulysses
    all-to-alls and the recomputation are traced (megawan/layers/tp_gemm.py, docs/dit.md). FP8: the
    same FP8 GEMMs on both sides (power-of-2 scales from exact amaxes), so the same bound holds."""
    results = run_distributed(workers.compiled_vs_eager, tp * cp, tp, cp, recompute, sp, fp8, timeout_s=1200)
    # Recomputation inside the compiled graph does what it says: "full" runs each attention core twice
    # (forward, recompute), "selective" and "ffn" once (kept), as without recomputation.
    calls = 2 * TINY.num_layers * (2 if recompute == "full" else 1)  # self- and cross-attention
    for result in results:
        _check_compiled(result)
        assert result["graph_breaks"] == {}, (result["rank"], result["graph_breaks"])
        assert result["unique_graphs"] == 1, result["unique_graphs"]
        assert result["attention_calls"] == calls, (result["rank"], result["attention_calls"], calls)


def test_compile_default_is_on_only_with_cuda():
    torch.manual_seed(0)
    model = WanDiT(TINY, runtime=DiTRuntime(linear_impl="local"))
    on_gpu = model.groups.device.type == "cuda"
    assert model.backend.compile_blocks is on_gpu
    assert all(bool(getattr(b, "_compiled_call_impl", None)) is on_gpu for b in model.blocks)


# ---- selective recomputation ---------------------------------------------------------------------

def _runtime(granularity, num_blocks=None):
    return DiTRuntime(linear_impl="local", activation_checkpointing=granularity is not None,
                      recompute_granularity=granularity or "full", recompute_num_blocks=num_blocks)


def _grads(runtime, device):
    torch.manual_seed(0)
    model = WanDiT(TINY, runtime=runtime).train()
    x, t, text = (v.to(device) for v in make_case(3, 6, 8, per_token=True))
    x.requires_grad_(True)
    out = model(x, t, text)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device)).sum().backward()
    return {"x": x.grad.cpu(), **{n: p.grad.cpu() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("granularity, num_blocks", [("full", None), ("selective", None), ("ffn", None),
                                                     ("selective", 1)])
def test_recomputation_gives_the_gradients_of_none(granularity, num_blocks, device):
    ref = _grads(_runtime(None), device)
    got = _grads(_runtime(granularity, num_blocks), device)
    assert set(got) == set(ref)
    for name, g in got.items():
        assert rel_err(g, ref[name]) <= 1e-6, (name, rel_err(g, ref[name]))


def test_recomputation_gives_the_gradients_of_none_tp2_cp2():
    """Under TP2 x CP2 (SP on): the recomputed collectives and the selective policy keep every grad."""
    for errs in run_distributed(workers.recompute_vs_none, 4, 2, 2, ["full", "selective", "ffn"]):
        assert all(e <= 1e-6 for e in errs.values()), errs


def _held_bytes(runtime) -> int:
    """Bytes the forward leaves allocated (activations kept for backward + the output), CPU profiler: the
    model is built on the CPU whatever the machine (the ``device`` fixture's exception)."""
    from megawan import parallel_state

    on_cpu = dataclasses.replace(parallel_state.get_groups(), device=torch.device("cpu"))
    torch.manual_seed(0)
    model = WanDiT(TINY, on_cpu, runtime).train()
    case = make_case(3, 6, 8, per_token=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(*case)
    del out
    return sum(e.self_cpu_memory_usage for e in prof.events())


def test_recomputation_keeps_what_it_says():
    held = {g: _held_bytes(_runtime(g)) for g in (None, "full", "selective", "ffn")}
    held["selective, 1 block"] = _held_bytes(_runtime("selective", 1))
    assert held["full"] < held["selective"] < held["ffn"] < held[None], held
    assert held["selective"] < held["selective, 1 block"] < held[None], held
    # "selective" keeps exactly the attention cores' outputs on top of "full": per block and batch
    # element, [heads, tokens, head_dim] fp32 plus the [heads, tokens] softmax statistic, for the
    # self-attention (36 video tokens) and the cross-attention (36 video-token queries).
    batch, tokens = 2, 3 * 3 * 4
    per_core = batch * TINY.num_heads * tokens * (TINY.head_dim + 1) * 4
    assert held["selective"] - held["full"] == TINY.num_layers * 2 * per_core, held


def test_bad_recompute_settings_are_named():
    with pytest.raises(ValueError, match="recompute_granularity must be one of"):
        DiTRuntime(recompute_granularity="attention")
    with pytest.raises(ValueError, match="recompute_num_blocks must be >= 0"):
        DiTRuntime(recompute_num_blocks=-1)
    assert DiTRuntime(activation_checkpointing=True, recompute_num_blocks=2).block_recompute(2) is None
    assert DiTRuntime(activation_checkpointing=True, recompute_num_blocks=2).block_recompute(1) == "full"
    assert DiTRuntime(recompute_granularity="ffn").block_recompute(0) is None


# ---- attention kernel choice -------------------------------------------------------------------

def test_attention_kernel_choice_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="megawan"):
        torch.manual_seed(0)
        model = WanDiT(TINY, runtime=DiTRuntime(dtype=torch.bfloat16, linear_impl="local"))
    # "auto" is SDPA's own dispatch on every device (tiny's head_dim 12 is one cuDNN attention refuses)
    assert model.backend.attention_backend == "torch"
    assert "DiT attention kernel: torch (auto: SDPA chooses its kernel" in caplog.text
    assert {b.self_attn.kernel.backend for b in model.blocks} == {"torch"}


def test_cudnn_kernel_needs_cuda_and_bf16():
    if not torch.cuda.is_available():
        with pytest.raises(ImportError, match="'cudnn'.*needs a CUDA device"):
            resolve_backend("cudnn", torch.device("cpu"), torch.bfloat16)
        pytest.skip("no CUDA device: the cuDNN kernel itself is checked on a GPU (bench/gpu_check.sh)")
    with pytest.raises(ValueError, match="needs bf16/fp16"):
        resolve_backend("cudnn", torch.device("cuda"), torch.float32)
    q = torch.randn(64, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    from megawan.layers.attention_kernels import attention

    torch.testing.assert_close(attention(q, q, q, "cudnn"), attention(q, q, q, "torch"), atol=2e-2, rtol=2e-2)
