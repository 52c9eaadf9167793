"""Dot-product attention kernels behind one switch: "auto", "torch", "cudnn", "flash" or "te".

``AttentionKernel`` is the module a layer holds: with "te" it owns Transformer Engine's
``DotProductAttention`` as a submodule, so ``.to()``, state dicts and FP8 autocast see it.

Every kernel takes q [sq, b, h, d], k/v [sk, b, h, d] (megatron's sbhd layout), is
bidirectional (no mask: padded keys are removed by the caller) and returns [sq, b, h, d].

The choice is made once per model (``resolve_backend``, called by ``DiTBackend.build``) and logged
on the ``megawan`` logger, so a run's log says which kernel it used:

* "torch": SDPA with torch's own dispatch: torch picks the kernel (FlashAttention-2, memory-efficient,
  cuDNN where torch itself enables it, math) under its own guards, per call;
* "cudnn": SDPA pinned to cuDNN attention (bf16/fp16 on CUDA, head_dim a multiple of 8). On Hopper it
  is the fastest kernel measured (590 TFLOP/s forward at 27,280 tokens vs 369 for SDPA's
  FlashAttention-2 backend), but it bypasses torch's choice: torch keeps cuDNN attention behind its
  own checks after correctness bugs, so pinning it is an explicit choice, proven by the GPU check
  (``bench/gpu_check.sh quick``: forward and backward against the math kernel at 27,280 tokens);
* "flash": the flash-attn package; "te": Transformer Engine's DotProductAttention;
* "auto": "torch" (SDPA's own dispatch) everywhere. cuDNN, flash-attn and TE are never forced
  implicitly: each is an option to select by name.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("auto", "torch", "cudnn", "flash", "te")
log = logging.getLogger("megawan")


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_backend(name: str) -> None:
    """Fail early, naming what is missing, when a GPU-only kernel is requested explicitly."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "flash" and not (_installed("flash_attn") and torch.cuda.is_available()):
        raise ImportError("attention_backend='flash' needs the flash-attn package and a CUDA device "
                          "(pip install megawan[gpu]); use 'torch' or 'auto' elsewhere")
    if name == "te" and not (_installed("transformer_engine") and torch.cuda.is_available()):
        raise ImportError("attention_backend='te' needs Transformer Engine and a CUDA device "
                          "(pip install megawan[gpu]); use 'torch' or 'auto' elsewhere")
    if name == "cudnn" and not torch.cuda.is_available():
        raise ImportError("attention_backend='cudnn' (SDPA's cuDNN attention) needs a CUDA device; "
                          "use 'torch' or 'auto' elsewhere")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete kernel for ``name`` on ``device`` with GEMMs in ``dtype``; logs the choice and why."""
    check_backend(name)
    if name == "auto":
        choice, why = "torch", "auto: SDPA chooses its kernel per call, under torch's own guards"
    else:
        choice, why = name, "selected by DiTRuntime.attention_backend"
    if choice == "cudnn" and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"attention_backend='cudnn' needs bf16/fp16 activations, the model runs {dtype}")
    log.info("DiT attention kernel: %s (%s, on %s)", choice, why, device)
    return choice


def check_head_dim(backend: str, head_dim: int) -> None:
    """cuDNN attention takes head dims that are multiples of 8 (torch's cuDNN SDPA check): refuse
    others when the kernel is built, not with SDPA's "No available kernel" at the first call."""
    if backend == "cudnn" and head_dim % 8:
        raise ValueError(f"attention_backend='cudnn' needs a head_dim that is a multiple of 8, this model's is "
                         f"{head_dim}: use 'auto' (SDPA chooses a kernel that takes it)")


def _torch_sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3))
    return out.permute(2, 0, 1, 3)


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return _torch_sdpa(q, k, v)


def _flash(q, k, v):
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    return out.transpose(0, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    if backend == "auto":  # the same rule as resolve_backend: SDPA's own dispatch
        backend = "torch"
    if backend == "te":
        raise ValueError("the 'te' kernel is a module: use AttentionKernel('te', heads, head_dim)")
    return {"torch": _torch_sdpa, "cudnn": _cudnn, "flash": _flash}[backend](q, k, v)


class AttentionKernel(nn.Module):
    """One attention call site: ``num_heads`` heads of ``head_dim`` per call, sbhd in and out."""

    def __init__(self, backend: str, num_heads: int, head_dim: int):
        super().__init__()
        check_head_dim(backend, head_dim)
        self.backend, self.num_heads, self.head_dim = backend, num_heads, head_dim
        if backend == "te":
            from transformer_engine.pytorch import DotProductAttention

            self.te = DotProductAttention(num_heads, head_dim, attn_mask_type="no_mask", qkv_format="sbhd")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend != "te":
            return attention(q, k, v, self.backend)
        s, b, h, d = q.shape
        return self.te(q.contiguous(), k.contiguous(), v.contiguous()).view(s, b, h, d)
