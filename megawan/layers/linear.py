"""Tensor-parallel linear layers: megatron-core's local implementation or Transformer Engine's.

``linear_impl`` is the one switch: "local" (megatron-core, runs on CPU) or "te" (Transformer Engine,
required -> error if missing). "auto" is megatron-core's local layers: TE is used only when asked for, by
``linear_impl="te"`` or by a te-* FP8 mode (``megawan.layers.fp8.check_mode``), never because it imports.

Initialisation is the same in every layout and on every device: each TP-split weight is drawn whole on
the CPU from the global RNG, in construction order, and this rank keeps its slice (megatron's CPU
initialisation, ``ModelParallelConfig.use_cpu_initialization``; see ``DiTBackend.build``).

Two kinds of column-parallel layer:

* ``column_parallel`` takes the residual stream as it is. Under sequence parallelism it all-gathers
  the token shards itself and, like Megatron, keeps only the local shard for backward (re-gathering
  it there); without SP its backward all-reduces the input gradient. Several outputs from one input
  are fused into one layer (q, k, v: ``stride=3``) so the input is gathered once.
* ``column_parallel_on_replicated`` takes an input that is already replicated in the TP region
  (the text context, entered once per forward by the model) and does no communication at all.

Row-parallel layers exit the TP region: reduce-scatter (SP) or all-reduce.

``fp8`` (a ``megawan.layers.fp8.NativeFp8`` or None) routes a local layer's GEMMs through FP8
(``torch._scaled_mm``); TE's layers take FP8 from ``te.fp8_autocast`` instead (see fp8.py).
``traceable`` runs a local layer through megawan's synchronous-collective linear function
(``megawan.layers.tp_gemm``), which ``torch.compile`` traces whole (megatron-core's does not: its
backward uses async collectives); FP8 layers always run through it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from megawan.layers import tp_gemm
from megawan.layers.fp8 import Fp8Gemm

LINEAR_IMPLS = ("auto", "local", "te")


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def resolve_linear_impl(impl: str) -> str:
    """"auto" -> "local": TE's linears are a choice, never a side effect of TE being installed."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"linear_impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    if impl == "te" and not te_available():
        raise ImportError("linear_impl='te' needs Transformer Engine and a CUDA device: install "
                          "megawan[gpu] (transformer-engine[pytorch]) on a GPU machine, or use 'local'")
    return "local" if impl == "auto" else impl


def _xavier(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.xavier_uniform_(w)


def _init_duplicated_shard(layer, out_features: int, config: ModelParallelConfig, tp_group) -> None:
    """A "duplicated" TE layer holding this rank's rows of a column-split weight: TE would initialise
    the shard by itself (a layout-dependent draw), so draw the whole weight as megatron's CPU init does
    and keep this rank's rows; the bias starts at zero, as megatron's."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    tp = config.tensor_model_parallel_size
    rank = torch.distributed.get_rank(tp_group) if tp > 1 else 0
    _initialize_affine_weight_cpu(layer.weight, out_features, layer.weight.shape[1], out_features // tp, 0,
                                  _xavier, params_dtype=config.params_dtype, rank=rank, world_size=tp,
                                  skip_set_tensor_parallel_attributes=True)
    with torch.no_grad():
        layer.bias.zero_()


def _finish(layer, weight_dim: int, fp8, traceable: bool, stride: int = 1):
    if fp8 is not None:  # native FP8: megawan's linear function with FP8 GEMMs (state dict unchanged)
        tp_gemm.use_gemm(layer, Fp8Gemm(fp8))
        layer.fp8 = fp8
    elif traceable and isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):  # local, not TE's
        tp_gemm.use_gemm(layer, tp_gemm.HIGH_PRECISION)
    return _with_tp_identity(layer, weight_dim, stride)


def _with_tp_identity(layer, weight_dim: int, stride: int = 1):
    """Tag the split dim of weight (and of a split bias) in every case.

    megatron tags a weight only when it initialises it; TE's layers tag nothing on CPU-less paths.
    """
    params = [(layer.weight, weight_dim)] + ([(layer.bias, 0)] if weight_dim == 0 else [])
    for p, dim in params:
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(p, attr):
                delattr(p, attr)
        set_tensor_model_parallel_attributes(p, True, dim, stride)
    return layer


def column_parallel(in_features: int, out_features: int, config: ModelParallelConfig, tp_group, impl: str,
                    stride: int = 1, fp8=None, traceable: bool = False):
    """Weight split on dim 0; input = the residual stream (token shards under SP, else replicated).

    ``stride`` fuses that many equal outputs: rank r holds rows [r-th slice of each], in order.
    """
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        layer = TEColumnParallelLinear(in_features, out_features, config=config, init_method=_xavier,
                                       gather_output=False, bias=True, skip_bias_add=False, is_expert=False,
                                       tp_group=tp_group, stride=stride)
    else:
        layer = ColumnParallelLinear(in_features, out_features, config=config, init_method=_xavier, bias=True,
                                     gather_output=False, stride=stride, tp_group=tp_group)
    return _finish(layer, 0, fp8, traceable, stride=stride)


def column_parallel_on_replicated(in_features: int, out_features: int, config: ModelParallelConfig, tp_group,
                                  impl: str, fp8=None, traceable: bool = False):
    """Weight split on dim 0; input already replicated in the TP region: no communication."""
    no_sp = dataclasses.replace(config, sequence_parallel=False)
    if impl == "te":
        # TE's column layer would all-reduce the input grad itself; that was done when the input
        # entered the TP region, so this rank's shard is a plain ("duplicated") TE GEMM. megatron's
        # TELinear refuses a tp_group in that mode (it is not split from TE's point of view); the
        # shard is initialised here instead, from the whole weight, as the split layers are.
        from megatron.core.extensions.transformer_engine import TELinear

        tp = config.tensor_model_parallel_size
        layer = TELinear(in_features, out_features // tp, parallel_mode="duplicated",
                         config=dataclasses.replace(no_sp, perform_initialization=False),
                         init_method=_xavier, bias=True, skip_bias_add=False,
                         skip_weight_param_allocation=False, tp_group=None)
        if config.perform_initialization:
            _init_duplicated_shard(layer, out_features, config, tp_group)
    else:
        layer = ColumnParallelLinear(in_features, out_features, config=no_sp, init_method=_xavier, bias=True,
                                     gather_output=False, disable_grad_reduce=True, tp_group=tp_group)
    return _finish(layer, 0, fp8, traceable)


def row_parallel(in_features: int, out_features: int, config: ModelParallelConfig, tp_group, impl: str,
                 fp8=None, traceable: bool = False):
    """Weight split on dim 1 (input features); output reduce-scattered (SP) or all-reduced."""
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TERowParallelLinear

        layer = TERowParallelLinear(in_features, out_features, config=config, init_method=_xavier, bias=True,
                                    input_is_parallel=True, skip_bias_add=False, is_expert=False,
                                    tp_group=tp_group)
    else:
        layer = RowParallelLinear(in_features, out_features, config=config, init_method=_xavier, bias=True,
                                  input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    return _finish(layer, 1, fp8, traceable)
