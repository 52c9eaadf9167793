"""The DiT's backend: how its layers compute, chosen once in ``WanDiT.__init__`` and handed to every layer.

It holds the parallel config and groups, builds the column/row-parallel linears (megatron-core's local
layers or Transformer Engine's) and the attention kernels, and carries the FP8 mode (megawan/layers/fp8.py).
A new fast path (FP8 GEMMs, compiled blocks) changes this object, not the layers' signatures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
from megatron.core import ModelParallelConfig
from megatron.core.transformer import TransformerConfig
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megawan.layers import fp8, linear
from megawan.layers.attention_kernels import AttentionKernel, resolve_backend
from megawan.layers.ring_attention import RING_ATTENTION_OPS
from megawan.parallel_state.groups import ContextParallelGroups

log = logging.getLogger("megawan")


# Ops whose outputs "selective" recomputation keeps: the attention cores (SDPA's kernels: cuDNN,
# FlashAttention-2, memory-efficient, CPU flash; ring attention's forward, whose kernels run inside it).
# Everything else in the block is recomputed.
_ATTENTION_CORE_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)) + RING_ATTENTION_OPS


def _keep_attention_cores(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_CORE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


selective_recompute_context = functools.partial(create_selective_checkpoint_contexts, _keep_attention_cores)


def resolve_compile_blocks(requested: bool | None, device: torch.device, linear_impl: str, attention: str) -> bool:
    """Whether ``WanDiT`` compiles its blocks. None: on where it pays, on CUDA (CPU inductor compiles
    slowly), unless the blocks hold Transformer Engine modules: their forwards break dynamo's graph, so
    a "compiled" block would run them eagerly and dynamo could not trace a checkpoint around them.
    Asking for compiled blocks with TE modules is refused rather than silently run eager."""
    uses_te = linear_impl == "te" or attention == "te"
    if requested and uses_te:
        raise ValueError("compile_blocks=True with Transformer Engine modules (linear_impl='te' or "
                         "attention_backend='te', or a te-* FP8 mode): TE's forwards break torch.compile's "
                         "graph, so the blocks would not run compiled. Use compile_blocks=False (or None), or "
                         "megatron-core's local linears (a native-* FP8 mode) with an SDPA kernel")
    if requested is None:
        requested = device.type == "cuda" and not uses_te
        if uses_te and device.type == "cuda":
            log.info("DiT blocks not compiled: they hold Transformer Engine modules (graph breaks)")
    return bool(requested)


@dataclass(frozen=True)
class DiTBackend:
    """mp_config: megatron's config (TP/CP sizes, sequence parallelism, GEMM dtype, init switches).
    tp_group / cp_group: this rank's groups (cp_group is None when cp == 1: no Ulysses exchange).
    linear_impl: resolved, "local" or "te". attention_backend: resolved, "torch" | "cudnn" | "flash" | "te"
    (logged when built). compile_blocks: resolved, whether ``WanDiT`` compiles its blocks.
    fp8: the FP8 mode (``fp8.FP8_MODES``). fp8_recipe: what the GEMMs of the linears built from this
    backend use: None (runtime dtype: "off", or a block kept in high precision), a ``fp8.NativeFp8``
    (native modes) or TE's recipe (te-* modes, applied by ``fp8_autocast``).
    fp8_amax_group: the group TE reduces amaxes over (None: every rank).
    context_parallel: how self-attention spans the CP group (Ulysses / ring / hybrid groups and sizes),
    from ``ParallelGroups.context_parallel(runtime.cp_impl, runtime.ulysses_size)``.
    """

    mp_config: ModelParallelConfig
    tp_group: object
    cp_group: object
    linear_impl: str
    attention_backend: str
    fp8: str = "off"
    compile_blocks: bool = False
    fp8_recipe: object = None
    fp8_amax_group: object = None
    context_parallel: ContextParallelGroups = ContextParallelGroups("ulysses", 1, 1)

    @classmethod
    def build(cls, groups, runtime) -> "DiTBackend":
        """From a ``ParallelGroups`` and a ``DiTRuntime``; fails early when a requested kernel is missing."""
        attention = resolve_backend(runtime.attention_backend, groups.device, runtime.dtype)
        context_parallel = groups.context_parallel(runtime.cp_impl, runtime.ulysses_size)
        if context_parallel.ring > 1 and attention in ("te", "flash"):
            raise ValueError(f"attention_backend={attention!r} is not wired into ring attention (cp_impl "
                             f"{context_parallel.impl!r} calls SDPA's log-sum-exp kernels): use 'auto', 'torch' "
                             f"or 'cudnn' (cross-attention then uses it), or cp_impl 'ulysses'")
        impl = fp8.check_mode(runtime.fp8, runtime.linear_impl, runtime.attention_backend, runtime.fp8_attention)
        # A TransformerConfig (a ModelParallelConfig), because megatron's TE wrappers read some of its
        # fields (symmetric_ar_type, ...). Its architecture fields are placeholders: the linears read
        # only the parallel, precision and initialisation fields.
        mp_config = TransformerConfig(
            num_layers=1, hidden_size=groups.tp, num_attention_heads=groups.tp,
            cuda_graph_scope=[],  # megatron's default ("full") is its deprecated spelling of [] and warns
            tensor_model_parallel_size=groups.tp, context_parallel_size=groups.cp,
            sequence_parallel=runtime.sequence_parallel and groups.tp > 1, params_dtype=runtime.dtype,
            # On every device: each full weight is drawn on the CPU from the global RNG, then sliced,
            # so a from-scratch model is the same in every layout and on CPU and GPU alike (megatron's
            # GPU path would initialise each shard from its per-TP-rank CUDA RNG stream instead). The
            # model is moved to its device once built (``WanDiT``).
            use_cpu_initialization=True,
            perform_initialization=runtime.init_weights, gradient_accumulation_fusion=False,
        )
        recipe = None
        if runtime.fp8.startswith("native-"):
            recipe = fp8.NativeFp8.for_mode(runtime.fp8)
        elif runtime.fp8.startswith("te-"):
            recipe = fp8.te_recipe(runtime.fp8, runtime.fp8_attention)
        impl = linear.resolve_linear_impl(impl)
        compile_blocks = resolve_compile_blocks(runtime.compile_blocks, groups.device, impl, attention)
        # TE reduces amaxes over one group: TP x CP x DP = every rank here (no pipeline stages).
        return cls(mp_config, groups.tp_group, groups.cp_group if groups.cp > 1 else None,
                   linear_impl=impl, attention_backend=attention, fp8=runtime.fp8,
                   compile_blocks=compile_blocks, fp8_recipe=recipe,
                   fp8_amax_group=torch.distributed.group.WORLD
                   if recipe is not None and torch.distributed.is_initialized() else None,
                   context_parallel=context_parallel)

    def high_precision(self) -> "DiTBackend":
        """The same backend with FP8 off for the layers built from it (first / last blocks in bf16)."""
        return dataclasses.replace(self, fp8_recipe=None)

    @property
    def tp(self) -> int:
        return self.mp_config.tensor_model_parallel_size

    @property
    def cp(self) -> int:
        return self.mp_config.context_parallel_size

    @property
    def sequence_parallel(self) -> bool:
        return self.mp_config.sequence_parallel

    # ---- layer factories --------------------------------------------------------------------------

    def column_parallel(self, in_features: int, out_features: int, stride: int = 1):
        """Input = the residual stream; see ``linear.column_parallel``."""
        return linear.column_parallel(in_features, out_features, self.mp_config, self.tp_group,
                                      self.linear_impl, stride=stride, fp8=self._native_fp8,
                                      traceable=self._traceable_linears)

    def column_parallel_on_replicated(self, in_features: int, out_features: int):
        """Input already replicated in the TP region: no communication."""
        return linear.column_parallel_on_replicated(in_features, out_features, self.mp_config, self.tp_group,
                                                    self.linear_impl, fp8=self._native_fp8,
                                                    traceable=self._traceable_linears)

    def row_parallel(self, in_features: int, out_features: int):
        return linear.row_parallel(in_features, out_features, self.mp_config, self.tp_group, self.linear_impl,
                                   fp8=self._native_fp8, traceable=self._traceable_linears)

    def attention_kernel(self, num_heads: int, head_dim: int) -> AttentionKernel:
        """A kernel module for ``num_heads`` heads per call (a submodule of the layer that uses it)."""
        return AttentionKernel(self.attention_backend, num_heads, head_dim)

    @property
    def _traceable_linears(self) -> bool:
        # megatron-core's own linear function is a graph break at TP > 1 (async collectives in backward)
        return self.compile_blocks and self.tp > 1

    @property
    def _native_fp8(self):
        return self.fp8_recipe if isinstance(self.fp8_recipe, fp8.NativeFp8) else None

    @property
    def _te_fp8(self) -> bool:
        return self.fp8.startswith("te-")

    def fp8_autocast(self):
        """The context all blocks run in: TE's FP8 autocast in te-* modes (built with the model's backend).

        Native modes need no context: their linears are FP8 themselves.
        """
        if self._te_fp8 and self.fp8_recipe is not None:
            return fp8.te_autocast(self.fp8_recipe, self.fp8_amax_group)
        return contextlib.nullcontext()

    def block_context(self):
        """The context one block runs in, inside ``fp8_autocast``: TE's FP8 switched off for a block kept
        in high precision (the native path builds such a block's linears without FP8)."""
        if self._te_fp8 and self.fp8_recipe is None:
            return fp8.te_disabled()
        return contextlib.nullcontext()

    def checkpoint(self, fn, *args, selective: bool = False):
        """Activation checkpointing of (part of) one block: TE's checkpoint in te-* modes (it recomputes
        under the same FP8 state as the forward; torch's would recompute in backward, outside
        ``fp8_autocast``), torch's otherwise. ``selective``: keep the attention cores' outputs (torch's
        selective checkpoint policy; TE's checkpoint has none and recomputes everything)."""
        if self._te_fp8:
            from transformer_engine.pytorch.distributed import checkpoint as te_checkpoint

            return te_checkpoint(fn, *args)
        extra = {"context_fn": selective_recompute_context} if selective else {}
        return checkpoint(fn, *args, use_reentrant=False, **extra)
