"""Tensor-parallel linear layers: megatron-core's local implementation or Transformer Engine's.

``linear_impl`` is the one switch: "local" (megatron-core, runs on CPU), "te" (Transformer Engine,
required -> error if missing) or "auto" (TE when importable and CUDA is available, else local).

Column-parallel layers here never communicate themselves: megawan enters the TP region once per
sub-block (one all-gather under sequence parallelism, or one identity-with-all-reduce-backward
without it) and feeds several column layers (q, k, v) from that single gathered input.
Row-parallel layers do megatron's usual exit: reduce-scatter (SP) or all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

LINEAR_IMPLS = ("auto", "local", "te")


@functools.lru_cache(maxsize=None)
def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def resolve_linear_impl(impl: str) -> str:
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"linear_impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    if impl == "te" and not te_available():
        raise ImportError("linear_impl='te' needs Transformer Engine and a CUDA device: install "
                          "megawan[gpu] (transformer-engine[pytorch]) on a GPU machine, or use 'local'")
    if impl == "auto":
        return "te" if te_available() else "local"
    return impl


def _xavier(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.xavier_uniform_(w)


def _with_tp_identity(layer, weight_dim: int):
    """megatron tags a weight's split dim only when it initialises it: tag it in every case."""
    if not hasattr(layer.weight, "tensor_model_parallel"):
        set_tensor_model_parallel_attributes(layer.weight, True, weight_dim, 1)
    return layer


def column_parallel(in_features: int, out_features: int, config: ModelParallelConfig, tp_group, impl: str):
    """Weight split on dim 0 (output features); input must already be in the TP region."""
    no_sp = dataclasses.replace(config, sequence_parallel=False)
    if impl == "te":
        # TE's column layer would all-reduce the input grad itself; megawan already did that on
        # entering the TP region, so this rank's shard is a plain ("duplicated") TE GEMM.
        from megatron.core.extensions.transformer_engine import TELinear
        tp = config.tensor_model_parallel_size
        layer = TELinear(in_features, out_features // tp, parallel_mode="duplicated", config=no_sp,
                         init_method=_xavier, bias=True, skip_bias_add=False,
                         skip_weight_param_allocation=False, tp_group=tp_group)
        for p in (layer.weight, layer.bias):
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(p, attr):
                    delattr(p, attr)
            set_tensor_model_parallel_attributes(p, True, 0, 1)
        return layer
    layer = ColumnParallelLinear(in_features, out_features, config=no_sp, init_method=_xavier, bias=True,
                                 gather_output=False, disable_grad_reduce=True, tp_group=tp_group)
    return _with_tp_identity(layer, weight_dim=0)


def row_parallel(in_features: int, out_features: int, config: ModelParallelConfig, tp_group, impl: str):
    """Weight split on dim 1 (input features); output reduce-scattered (SP) or all-reduced."""
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TERowParallelLinear

        return TERowParallelLinear(in_features, out_features, config=config, init_method=_xavier, bias=True,
                                   input_is_parallel=True, skip_bias_add=False, is_expert=False,
                                   tp_group=tp_group)
    layer = RowParallelLinear(in_features, out_features, config=config, init_method=_xavier, bias=True,
                              input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
    return _with_tp_identity(layer, weight_dim=1)


def enter_tp_region(x: torch.Tensor, config: ModelParallelConfig, tp_group) -> torch.Tensor:
    """Residual-stream activations -> the input that column-parallel layers expect.

    Sequence parallel: all-gather the token shards (backward reduce-scatters). Otherwise the
    input is replicated: identity forward, all-reduce of the input gradient backward.
    """
    if config.tensor_model_parallel_size == 1:
        return x
    if config.sequence_parallel:
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=tp_group)
    return copy_to_tensor_model_parallel_region(x, group=tp_group)
