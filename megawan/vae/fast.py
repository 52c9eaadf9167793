"""Faster VAE38 decode paths: bf16 weights and activations, channels-last convolutions, compiled blocks.

``prepare_decode(model, dtype, channels_last, compile)`` changes a ``WanVAE38`` in place and returns
it; ``decode`` is then called as usual. Each path changes the numbers, so each has its error against
the fp32 decode measured, on CPU by tests/test_vae_fast.py at test size and on a GPU at full size by
bench/bench_vae_decode_paths.py (docs/benchmarks.md):

* ``dtype=torch.bfloat16``: weights and activations in bf16 (RMS statistics stay fp32, see norm.py);
* ``channels_last=True``: conv weights in ``channels_last_3d`` / ``channels_last`` memory format, the
  layout cuDNN's fastest convolution kernels use; the math is the same, only summation order moves;
* ``compile=True``: ``torch.compile`` of each residual block, regionally (the norm + SiLU element-wise
  work between the convolutions fuses; the frame caches are Python state, kept outside the graphs).
"""

from __future__ import annotations

import torch
from torch import nn

from megawan.vae.blocks import ResidualBlock


def _to_channels_last(module: nn.Module) -> None:
    for p in module.parameters():
        fmt = {5: torch.channels_last_3d, 4: torch.channels_last}.get(p.dim())
        if fmt is not None:
            p.data = p.data.contiguous(memory_format=fmt)


def prepare_decode(model: nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                   compile: bool = False) -> nn.Module:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"VAE decode dtype must be float32, bfloat16 or float16, got {dtype}")
    model.to(dtype)
    if channels_last:
        _to_channels_last(model)
    if compile:
        for block in model.modules():
            if isinstance(block, ResidualBlock):
                block.compile()
    return model
