"""A stand-in for Transformer Engine (``transformer_engine``), for tests on machines without it.

It has the documented signatures of what megawan and megatron-core's TE wrappers
(``megatron.core.extensions.transformer_engine``) call, so megatron's own wrapper code runs on it
unchanged, and models the behaviour the tests look at:

* ``pytorch.Linear``: TE's constructor arguments (unknown keywords are refused, as TE's are), its local
  weight shape per ``parallel_mode`` and ``tp_size``, its initialisation (``init_method`` on the local
  weight under ``get_rng_state_tracker().fork(rng_tracker_name)``, bias zero). Forward only at
  ``tp_size == 1`` (TE's own communication is not modelled: a forward at TP > 1 raises).
  Inside ``fp8_autocast(enabled=True)`` the GEMM operands are rounded through float8 e4m3 with one
  scale per tensor, so values computed with and without FP8 differ, as TE's do.
* ``pytorch.fp8_autocast`` / ``pytorch.fp8.FP8GlobalStateManager``: the FP8 on / off state.
* ``pytorch.distributed.checkpoint``: recomputes under the FP8 state of the forward (TE's documented
  reason to use it), keyword arguments popped as TE pops them.
* ``pytorch.DotProductAttention``: sbhd in, [s, b, h * d] out, computed with SDPA.
* ``common.recipe``: ``DelayedScaling``, ``Float8CurrentScaling``, ``Format``.

``install()`` must run before anything imports megatron-core's TE extension: the tests use it in
spawned ranks (``megawan.testing.run_distributed``), whose worker module calls it first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.machinery
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

VERSION = "2.2.0"  # a release megatron-core 0.16.1 supports; below the gates that need TE's ops / router


class _FP8State:
    enabled = False
    recipe = None


class FP8GlobalStateManager:
    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return _FP8State.enabled

    @classmethod
    def get_fp8_recipe(cls):
        return _FP8State.recipe


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool = False, fp8_recipe=None, fp8_group=None,
                 _graph: bool = False):
    saved = (_FP8State.enabled, _FP8State.recipe)
    _FP8State.enabled, _FP8State.recipe = enabled, fp8_recipe if enabled else None
    try:
        yield
    finally:
        _FP8State.enabled, _FP8State.recipe = saved


def _fp8_round(t: torch.Tensor) -> torch.Tensor:
    scale = t.detach().abs().amax().float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return ((t.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(t.dtype)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False,
                 fuse_wgrad_accumulation: bool = False, tp_group=None, tp_size: int = 1,
                 get_rng_state_tracker=None, rng_tracker_name=None, init_method=None, bias: bool = True,
                 return_bias: bool = False, params_dtype=None, parallel_mode=None, device="cuda",
                 ub_overlap_ag: bool = False, ub_overlap_rs: bool = False, ub_name=None,
                 delay_wgrad_compute: bool = False, symmetric_ar_type=None, name=None):
        super().__init__()
        if parallel_mode not in (None, "column", "row"):
            raise ValueError(f"parallel_mode {parallel_mode!r} not supported")
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bias
        self.parallel_mode, self.tp_size, self.return_bias = parallel_mode, tp_size, return_bias
        self.sequence_parallel = sequence_parallel
        out_local = out_features // tp_size if parallel_mode == "column" else out_features
        in_local = in_features // tp_size if parallel_mode == "row" else in_features
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_local if parallel_mode == "column" else out_features,
                                             dtype=dtype, device=device)) if bias else None
        if init_method is not None:
            split = parallel_mode in ("column", "row") and tp_size > 1
            fork = (get_rng_state_tracker().fork(rng_tracker_name) if rng_tracker_name
                    else get_rng_state_tracker().fork()) if (get_rng_state_tracker and split) \
                else contextlib.nullcontext()
            with fork:
                init_method(self.weight)
        if self.bias is not None:
            with torch.no_grad():
                self.bias.zero_()

    def forward(self, inp: torch.Tensor, is_first_microbatch=None):
        if self.tp_size > 1 and self.parallel_mode is not None:
            raise NotImplementedError("fake TE: a forward of a TP-split layer is not modelled")
        w = self.weight
        if FP8GlobalStateManager.is_fp8_enabled():
            inp, w = _fp8_round(inp), _fp8_round(w)
        out = F.linear(inp, w)
        if self.return_bias:
            return out, self.bias
        return out + self.bias if self.bias is not None else out


class LayerNormLinear(Linear):
    pass


class GroupedLinear(nn.Module):
    pass


class DotProductAttention(nn.Module):
    def __init__(self, num_attention_heads: int, kv_channels, num_gqa_groups=None, attention_dropout: float = 0.0,
                 qkv_format: str = "sbhd", attn_mask_type: str = "causal", window_size=None,
                 sequence_parallel: bool = False, tp_size: int = 1, get_rng_state_tracker=None, tp_group=None,
                 layer_number=None, attention_type: str = "self", cp_group=None, cp_global_ranks=None,
                 cp_stream=None, cp_comm_type: str = "p2p", softmax_scale=None):
        super().__init__()
        if qkv_format != "sbhd" or attn_mask_type != "no_mask":
            raise NotImplementedError("fake TE: only sbhd without a mask is modelled")

    def forward(self, query, key, value, **kwargs):
        s, b, h, d = query.shape
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (query, key, value)))
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


class QuantizedTensor(torch.Tensor):
    """TE 2's base class of FP8 tensors (isinstance checks only: no FP8 weights here)."""


class CudaRNGStatesTracker:
    def __init__(self, *args, **kwargs):
        self.states_ = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)


class Calls:
    """What the tests read back: how often TE's checkpoint ran."""

    checkpoint = 0


def checkpoint(function, *args, **kwargs):
    Calls.checkpoint += 1
    for key in ("use_reentrant", "distribute_saved_activations", "tp_group", "get_rng_state_tracker"):
        kwargs.pop(key, None)
    saved = (_FP8State.enabled, _FP8State.recipe)

    def contexts():
        return contextlib.nullcontext(), fp8_autocast(enabled=saved[0], fp8_recipe=saved[1])

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, context_fn=contexts, **kwargs)


class activation_recompute_forward(contextlib.nullcontext):  # noqa: N801 - TE's name
    def __init__(self, activation_recompute: bool = False, recompute_phase: bool = False):
        super().__init__()


def is_fp8_activation_recompute_enabled() -> bool:
    return False


class Format(enum.Enum):
    E4M3 = "E4M3"
    E5M2 = "E5M2"
    HYBRID = "HYBRID"


@dataclasses.dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    scaling_factor_compute_algo: object = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False


@dataclasses.dataclass
class Float8CurrentScaling:
    fp8_format: Format = Format.HYBRID
    fp8_dpa: bool = False
    fp8_mha: bool = False


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec finds it
    mod.__dict__.update(attrs)
    return mod


def install() -> None:
    """Put the stand-in into ``sys.modules`` (idempotent); refuse if the real TE or megatron's TE
    extension is already imported (the extension binds TE at import time)."""
    if "transformer_engine" in sys.modules:
        if getattr(sys.modules["transformer_engine"], "__fake__", False):
            return
        raise RuntimeError("the real transformer_engine is imported: the fake cannot replace it")
    if "megatron.core.extensions.transformer_engine" in sys.modules:
        raise RuntimeError("megatron's TE extension was imported before the fake TE: install it first")
    fp8 = _module("transformer_engine.pytorch.fp8", FP8GlobalStateManager=FP8GlobalStateManager,
                  fp8_autocast=fp8_autocast)
    distributed = _module("transformer_engine.pytorch.distributed", checkpoint=checkpoint,
                          CudaRNGStatesTracker=CudaRNGStatesTracker,
                          activation_recompute_forward=activation_recompute_forward,
                          is_fp8_activation_recompute_enabled=is_fp8_activation_recompute_enabled)
    # TE's fusible-operation API: megatron names its classes in annotations only
    ops = _module("transformer_engine.pytorch.ops", Sequential=nn.Sequential, BasicOperation=nn.Module,
                  FusibleOperation=nn.Module)
    tensor = _module("transformer_engine.pytorch.tensor", QuantizedTensor=QuantizedTensor)
    pytorch = _module("transformer_engine.pytorch", ops=ops, tensor=tensor, Linear=Linear, LayerNormLinear=LayerNormLinear,
                      GroupedLinear=GroupedLinear, DotProductAttention=DotProductAttention,
                      fp8_autocast=fp8_autocast, fp8=fp8, distributed=distributed, checkpoint=checkpoint)
    recipe = _module("transformer_engine.common.recipe", DelayedScaling=DelayedScaling,
                     Float8CurrentScaling=Float8CurrentScaling, Format=Format)
    common = _module("transformer_engine.common", recipe=recipe)
    te = _module("transformer_engine", __version__=VERSION, __fake__=True, pytorch=pytorch, common=common)
    for mod in (te, pytorch, ops, tensor, fp8, distributed, common, recipe):
        sys.modules[mod.__name__] = mod
