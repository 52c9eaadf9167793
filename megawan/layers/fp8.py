"""FP8 GEMMs for the DiT blocks' linears: one switch, ``DiTRuntime.fp8``.

Modes:

* ``"off"``: the GEMMs run in the runtime dtype (bf16 in training).
* ``"native-tensorwise"`` / ``"native-rowwise"``: megatron-core's local linears with their GEMMs
  replaced by ``torch._scaled_mm`` on Hopper+ (on CPU its product in fp32, see ``scaled_mm``). Dynamic scales computed from the
  tensor just before each cast: one per tensor, or one per row of the left operand and per column of
  the right one (along the GEMM's inner dimension). Forward operands are e4m3. Gradients are e5m2 in
  tensorwise mode; in rowwise mode e4m3 (torchao's rowwise recipe: per-row scales already cover the
  gradients' range, and torch's rowwise CUDA kernel is built for e4m3 operands).
* ``"te-delayed"`` / ``"te-current"``: Transformer Engine linears under ``te.fp8_autocast`` with
  delayed (amax history) or current (per-tensor, just-in-time) scaling, HYBRID format (e4m3 forward,
  e5m2 backward); amaxes reduced over every rank (TP x CP x DP: the model-parallel and data-parallel
  ranks of one pipeline stage, as Megatron does). Optional FP8 dot-product attention with TE's kernel.
  Written against TE's documented API; not run here (no TE or GPU on the machines this was built on).

Master weights, gradients handed to the optimizer and checkpoints stay in high precision: FP8 exists
only inside the GEMMs, so an FP8 run's checkpoint is a bf16 run's checkpoint and the reverse.

From torchao (``torchao.float8``): the scale computation (``tensor_to_scale``), the saturated cast
(``to_fp8_saturated``) and the scaled GEMM wrapper (``addmm_float8_unwrapped``). Written here: the
three GEMMs of a linear in FP8 (``Fp8Gemm``), run by megawan's tensor-parallel linear function
(``megawan.layers.tp_gemm``), because torchao's ``Float8Linear`` is an ``nn.Linear`` and knows nothing
of Megatron's sequence-parallel all-gather (and re-gather in backward), the reduce-scatter /
all-reduce of the input gradient, or megatron's linear signature.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_MODES = ("off", "native-tensorwise", "native-rowwise", "te-delayed", "te-current")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class NativeFp8:
    """The native path's recipe: scale granularity and the gradients' FP8 format."""

    rowwise: bool
    grad_dtype: torch.dtype

    @classmethod
    def for_mode(cls, mode: str) -> "NativeFp8":
        rowwise = mode == "native-rowwise"
        return cls(rowwise=rowwise, grad_dtype=E4M3 if rowwise else E5M2)


def check_mode(mode: str, linear_impl: str, attention_backend: str, fp8_attention: bool) -> str:
    """Validate the FP8 switch against the other runtime switches; return the linear impl to use.

    Native modes need megatron's local linears ("auto" resolves to them); TE modes need TE's linears.
    Errors name what is missing.
    """
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {mode!r}")
    if fp8_attention and not mode.startswith("te-"):
        raise ValueError(f"fp8_attention needs a Transformer Engine FP8 mode (te-delayed | te-current), "
                         f"not fp8={mode!r}")
    if fp8_attention and attention_backend != "te":
        raise ValueError("fp8_attention runs inside TE's DotProductAttention: set attention_backend='te'")
    if mode.startswith("native-"):
        if not _installed("torchao"):
            raise ImportError(f"fp8={mode!r} needs torchao (pip install torchao; it is in megawan's requirements)")
        check_torchao()
        if not hasattr(torch, "_scaled_mm"):
            raise ImportError(f"fp8={mode!r} needs torch._scaled_mm (torch >= 2.4)")
        if linear_impl == "te":
            raise ValueError(f"fp8={mode!r} replaces the GEMMs of megatron's local linears: use "
                             f"linear_impl='local' or 'auto', or a te-* FP8 mode with TE linears")
        return "local"
    if mode.startswith("te-"):
        if not (_installed("transformer_engine") and torch.cuda.is_available()):
            raise ImportError(f"fp8={mode!r} needs Transformer Engine (transformer_engine.pytorch) and a CUDA "
                              f"device: install megawan[gpu] on a GPU machine, or use a native-* FP8 mode")
        if linear_impl == "local":
            raise ValueError(f"fp8={mode!r} runs TE's linears: use linear_impl='te' or 'auto'")
        return "te"
    return linear_impl


def check_torchao() -> None:
    """torchao's private float8 pieces the native path calls, with the keywords it passes: a torchao
    that moved or changed them fails here, naming the version this was written for."""
    from torchao.float8 import float8_ops, float8_utils

    from megawan import compat

    compat.require(float8_utils, "tensor_to_scale",
                   ("hp_tensor", "float8_dtype", "scaling_granularity", "axiswise_dim", "round_scales_to_power_of_2"))
    compat.require(float8_utils, "to_fp8_saturated", ("x", "float8_dtype"))
    compat.require(float8_ops, "addmm_float8_unwrapped",
                   ("a_data", "a_scale", "b_data", "b_scale", "output_dtype", "use_fast_accum"))


def te_recipe(mode: str, fp8_attention: bool):
    """TE's recipe object for a te-* mode (HYBRID: e4m3 forward, e5m2 gradients)."""
    from transformer_engine.common.recipe import DelayedScaling, Float8CurrentScaling, Format

    if mode == "te-delayed":
        return DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=1024, amax_compute_algo="max",
                              fp8_dpa=fp8_attention)
    return Float8CurrentScaling(fp8_format=Format.HYBRID, fp8_dpa=fp8_attention)


def te_autocast(recipe, amax_group):
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=amax_group)


def te_disabled():
    """Inside an FP8 autocast: run this region (a bf16 edge block) in high precision."""
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=False)


# ---- native GEMM ----------------------------------------------------------------------------------

def _cast(x: torch.Tensor, dtype: torch.dtype, rowwise: bool, dim: int):
    """x in FP8 and its scale (x_fp8 = x * scale); rowwise: one scale per slice along ``dim`` (kept dim)."""
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated

    gran = ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE
    scale = tensor_to_scale(x, dtype, scaling_granularity=gran, axiswise_dim=dim if rowwise else None,
                            round_scales_to_power_of_2=True)
    # Scales are powers of 2, so scaling in bf16 is exact: no fp32 copy of the activation.
    scaled = x * scale.to(x.dtype) if x.dtype == torch.bfloat16 else x.float() * scale
    return to_fp8_saturated(scaled, dtype), scale


def fp8_mm(a: torch.Tensor, b: torch.Tensor, a_dtype: torch.dtype, b_dtype: torch.dtype, rowwise: bool,
           out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a [M, K] @ b [K, N] with both operands cast to FP8 (scales along K when rowwise).

    The inner dimension is zero-padded to a multiple of 16 (a ``_scaled_mm`` constraint on GPUs; the
    weight-gradient GEMM contracts over tokens, whose count is arbitrary): zeros add nothing.
    """
    k = a.shape[1]
    if k % 16:
        a, b = F.pad(a, (0, 16 - k % 16)), F.pad(b, (0, 0, 0, 16 - k % 16))
    a8, sa = _cast(a, a_dtype, rowwise, dim=-1)  # [M, K] row-major, scales [M, 1]
    bt8, sbt = _cast(b.t(), b_dtype, rowwise, dim=-1)  # b^T row-major = b column-major, as _scaled_mm wants
    sb = sbt.t() if rowwise else sbt  # [1, N]
    return scaled_mm(a8.contiguous(), sa, bt8.contiguous().t(), sb, out_dtype, fast_accum)


def scaled_mm(a8: torch.Tensor, sa: torch.Tensor, b8: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
              fast_accum: bool) -> torch.Tensor:
    """(a8 / sa) @ (b8 / sb) in ``out_dtype``: a8 [M, K] row-major, b8 [K, N] column-major, FP8 values with
    the scales they were cast with (x_fp8 = x * scale).

    On CUDA: ``torch._scaled_mm`` through torchao's wrapper. Elsewhere the same product in fp32 (FP8 values
    and power-of-2 scales are exact in fp32; the accumulation is fp32 as the kernel's): torch's CPU
    ``_scaled_mm`` is a reference loop, about 2e7 multiply-adds/s on the 2-core CI machine (a 30-step tiny
    training took over half an hour), and computes nothing more. tests/test_dit_fp8.py checks the two agree.
    """
    if a8.is_cuda:
        from torchao.float8.float8_ops import addmm_float8_unwrapped

        return addmm_float8_unwrapped(a8, sa, b8, sb, out_dtype, use_fast_accum=fast_accum)
    return (torch.mm(a8.float(), b8.float()) / (sa.float() * sb.float())).to(out_dtype)


class Fp8Gemm:
    """The GEMMs of ``megawan.layers.tp_gemm.TPLinearFunction`` in FP8: forward e4m3 x e4m3 (fast
    accumulation, as torchao's forward), input and weight gradients with the gradient in the recipe's
    format. Both operands are re-cast in backward: rowwise scales of the weight-gradient GEMM run along
    the other axis, and only the high-precision weight and input shard are kept for backward."""

    def __init__(self, recipe: NativeFp8):
        self.recipe = recipe

    def forward(self, x2, weight):
        return fp8_mm(x2, weight.t(), E4M3, E4M3, self.recipe.rowwise, x2.dtype, fast_accum=True)

    def dgrad(self, g2, weight):
        return fp8_mm(g2, weight, self.recipe.grad_dtype, E4M3, self.recipe.rowwise, g2.dtype)

    def wgrad(self, g2, x2, weight):
        return fp8_mm(g2.t(), x2, self.recipe.grad_dtype, E4M3, self.recipe.rowwise, weight.dtype)

    def __repr__(self) -> str:
        return f"Fp8Gemm({self.recipe})"
