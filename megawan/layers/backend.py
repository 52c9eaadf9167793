"""The DiT's backend: how its layers compute, chosen once in ``WanDiT.__init__`` and handed to every layer.

It holds the parallel config and groups, builds the column/row-parallel linears (megatron-core's local
layers or Transformer Engine's) and the attention kernels, and has the slot for an FP8 recipe. A new
fast path (FP8 GEMMs, compiled blocks) changes this object, not the layers' signatures.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from megatron.core import ModelParallelConfig

from megawan.layers import linear
from megawan.layers.attention_kernels import AttentionKernel, resolve_backend


@dataclass(frozen=True)
class DiTBackend:
    """mp_config: megatron's config (TP/CP sizes, sequence parallelism, GEMM dtype, init switches).
    tp_group / cp_group: this rank's groups (cp_group is None when cp == 1: no Ulysses exchange).
    linear_impl: resolved, "local" or "te". attention_backend: resolved, "torch" | "cudnn" | "flash" | "te"
    (logged when built). compile_blocks: resolved, whether ``WanDiT`` compiles its blocks.
    fp8_recipe: None (bf16/fp32 GEMMs) until the FP8 path lands; it will be applied in ``fp8_autocast``.
    """

    mp_config: ModelParallelConfig
    tp_group: object
    cp_group: object
    linear_impl: str
    attention_backend: str
    compile_blocks: bool = False
    fp8_recipe: object = None

    @classmethod
    def build(cls, groups, runtime) -> "DiTBackend":
        """From a ``ParallelGroups`` and a ``DiTRuntime``; fails early when a requested kernel is missing."""
        attention = resolve_backend(runtime.attention_backend, groups.device, runtime.dtype)
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=groups.tp, context_parallel_size=groups.cp,
            sequence_parallel=runtime.sequence_parallel and groups.tp > 1, params_dtype=runtime.dtype,
            # CPU init builds each full weight from one RNG stream, then slices it: the same model for
            # every TP layout. On GPUs megatron initialises shards in place (RNG tracker).
            use_cpu_initialization=groups.device.type == "cpu",
            perform_initialization=runtime.init_weights, gradient_accumulation_fusion=False,
        )
        compile_blocks = runtime.compile_blocks
        if compile_blocks is None:  # on by default where it pays: GPUs (CPU inductor compiles slowly)
            compile_blocks = groups.device.type == "cuda"
        return cls(mp_config, groups.tp_group, groups.cp_group if groups.cp > 1 else None,
                   linear.resolve_linear_impl(runtime.linear_impl), attention, compile_blocks=compile_blocks)

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
                                      self.linear_impl, stride=stride)

    def column_parallel_on_replicated(self, in_features: int, out_features: int):
        """Input already replicated in the TP region: no communication."""
        return linear.column_parallel_on_replicated(in_features, out_features, self.mp_config, self.tp_group,
                                                    self.linear_impl)

    def row_parallel(self, in_features: int, out_features: int):
        return linear.row_parallel(in_features, out_features, self.mp_config, self.tp_group, self.linear_impl)

    def attention_kernel(self, num_heads: int, head_dim: int) -> AttentionKernel:
        """A kernel module for ``num_heads`` heads per call (a submodule of the layer that uses it)."""
        return AttentionKernel(self.attention_backend, num_heads, head_dim)

    def fp8_autocast(self):
        """The context the blocks run in: nothing today; the FP8 recipe's autocast once it lands."""
        if self.fp8_recipe is not None:
            raise NotImplementedError("the DiT has no FP8 path yet: leave fp8_recipe as None")
        return contextlib.nullcontext()
