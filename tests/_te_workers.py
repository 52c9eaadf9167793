"""Rank functions that build megawan's Transformer Engine paths on CPU, over the fake TE (tests/_fake_te.py).

The fake is installed before anything imports megatron-core (megatron's TE wrappers bind TE when their
module is imported), and each rank reports CUDA as available, as a GPU node does: the checks that gate
TE on "installed and a GPU" pass, while the ranks themselves compute on CPU (gloo). megatron-core's own
TE wrappers (``TELinear``, ``TEColumnParallelLinear``, ``TERowParallelLinear``) run unchanged.
"""

from __future__ import annotations

from tests import _fake_te

_fake_te.install()

import dataclasses  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megawan import parallel_state  # noqa: E402
from megawan.layers.backend import DiTBackend  # noqa: E402
from megawan.layers.rope import rope_tables  # noqa: E402
from megawan.models.dit import DiTRuntime, WanBlock, WanDiTConfig  # noqa: E402
from megawan.parallel_state import ParallelGroups  # noqa: E402

TINY = WanDiTConfig.preset("tiny")


def _gpu_node():
    torch.cuda.is_available = lambda: True  # what a GPU node reports; the ranks are gloo (CPU) ranks


def full_params(module, groups) -> dict:
    """Every parameter whole: TP-split ones gathered over TP (a fused one, stride s, holds s slices per rank)."""
    out = {}
    for name, p in module.named_parameters():
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False) and groups.tp > 1:
            ranks = [torch.empty_like(t) for _ in range(groups.tp)]
            dist.all_gather(ranks, t.contiguous(), group=groups.tp_group)
            stride, dim = p.partition_stride, p.partition_dim
            pieces = [r.chunk(stride, dim=dim) for r in ranks]
            t = torch.cat([torch.cat([pc[i] for pc in pieces], dim=dim) for i in range(stride)], dim=dim)
        out[name] = t.float().cpu().clone()
    return out


def _block(groups, runtime, seed=0):
    torch.manual_seed(seed)
    return WanBlock(TINY, DiTBackend.build(groups, runtime), runtime.dtype)


def init_in_every_layout(tp: int) -> dict:
    """One block, from the same seed: at TP 1 on CPU (the reference), at ``tp`` as a GPU rank builds it
    with megatron's local linears (the backend built for a CUDA device; megatron's GPU-side code runs
    here on cpu_compat's stand-ins), and at ``tp`` with TE's linears."""
    _gpu_node()
    groups = parallel_state.initialize(tp=tp, num_heads=TINY.num_heads, backend="gloo")
    single = ParallelGroups.single_rank(torch.device("cpu"))  # collective: every rank builds it
    local = DiTRuntime(linear_impl="local", attention_backend="torch", compile_blocks=False)
    reference = full_params(_block(single, local), single)
    as_gpu = dataclasses.replace(groups, device=torch.device("cuda"))
    gpu_local = full_params(_block(as_gpu, local), groups)
    try:
        te = full_params(_block(groups, dataclasses.replace(local, linear_impl="te")), groups)
    except Exception as e:  # noqa: BLE001 - reported, so the local check above still speaks for itself
        te = f"{type(e).__name__}: {e}"
    return {"reference": reference, "gpu_local": gpu_local, "te": te}


def _block_inputs(seq: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(seq, 1, TINY.dim, generator=g)
    e0 = torch.randn(1, 1, 6, TINY.dim, generator=g)
    context = torch.randn(TINY.text_len, 1, TINY.dim, generator=g)
    cos, sin = rope_tables(TINY.head_dim, (1, 4, seq // 4), 0, seq, seq, TINY.rope_theta, device=x.device)
    return x, e0, context, cos, sin, seq


def _train_step(block, backend, inputs):
    x, *rest = inputs
    x = x.clone().requires_grad_(True)
    with backend.fp8_autocast():  # as WanDiT.forward runs its blocks; backward runs outside it, as in training
        out = block(x, *rest)
    out.float().square().mean().backward()
    return out.detach(), x.grad.detach(), {n: p.grad.detach().clone() for n, p in block.named_parameters()}


def te_single_rank() -> dict:
    """TE's linears at TP 1: the build, FP8 with the ffn recompute, and the compile switch."""
    _gpu_node()
    groups = parallel_state.initialize(tp=1, num_heads=TINY.num_heads, backend="gloo")
    result = {}
    fp8 = DiTRuntime(linear_impl="te", attention_backend="torch", fp8="te-current", compile_blocks=False)
    backend = DiTBackend.build(groups, fp8)
    inputs = _block_inputs()
    runs = {}
    for recompute in (None, "ffn"):
        torch.manual_seed(0)
        block = WanBlock(TINY, backend, torch.float32, recompute=recompute).train()
        before = _fake_te.Calls.checkpoint
        runs[recompute] = _train_step(block, backend, inputs)
        result[f"te_checkpoint_calls_{recompute}"] = _fake_te.Calls.checkpoint - before
    result["layers"] = sorted({type(m).__name__ for m in block.modules() if "Linear" in type(m).__name__})
    result["no_recompute"], result["ffn_recompute"] = runs[None], runs["ffn"]
    # The same model without FP8, to show that FP8 changes the values (else the recompute check is empty)
    torch.manual_seed(0)
    bf16_like = DiTRuntime(linear_impl="te", attention_backend="torch", compile_blocks=False)
    off_backend = DiTBackend.build(groups, bf16_like)
    result["fp8_off"] = _train_step(WanBlock(TINY, off_backend, torch.float32).train(), off_backend, inputs)
    # compile_blocks with TE modules: refused when asked for; off by default on a GPU device
    try:
        DiTBackend.build(groups, dataclasses.replace(bf16_like, compile_blocks=True))
        result["compile_true"] = "built"
    except ValueError as e:
        result["compile_true"] = str(e)
    as_gpu = dataclasses.replace(groups, device=torch.device("cuda"))
    result["compile_default_on_gpu"] = DiTBackend.build(as_gpu, dataclasses.replace(bf16_like,
                                                                                    compile_blocks=None)).compile_blocks
    result["compile_default_local_on_gpu"] = DiTBackend.build(
        as_gpu, dataclasses.replace(bf16_like, linear_impl="local", compile_blocks=None)).compile_blocks
    return result
