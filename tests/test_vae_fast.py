"""The faster VAE38 decode paths (megawan/vae/fast.py) against the fp32 decode, at test size on CPU.

Bounds: paths that keep fp32 only reorder sums (channels-last kernels, inductor's fused norm + SiLU):
rel. L2 <= 1e-5. bf16 paths: one bf16 rounding per op through ~30 layers; measured 1.5e-2 here
(printed with -s); the bound, 3e-2, is set from that (the full-size GPU figure is in docs/benchmarks.md).
"""

from __future__ import annotations

import copy

import pytest
import torch

from megawan.vae.fast import prepare_decode
from megawan.vae.model import WanVAE38, WanVAE38Config

FP32_TOL = 1e-5
BF16_TOL = 3e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def vae_and_reference():
    torch.manual_seed(0)
    vae = WanVAE38(WanVAE38Config.tiny()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # scaled random weights: outputs mostly inside the [-1, 1] clamp
        for name, p in vae.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif not name.endswith("gamma"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    latents = torch.randn(1, 48, 3, 4, 3, generator=g)
    with torch.no_grad():
        ref = vae.decode(latents)
    assert (ref.abs() < 1).float().mean() > 0.9, "outputs saturated by the clamp: comparison too weak"
    return vae, latents, ref


@pytest.mark.parametrize("dtype, channels_last, compiled, tol", [
    (torch.float32, True, False, FP32_TOL),
    (torch.float32, False, True, FP32_TOL),
    (torch.bfloat16, False, False, BF16_TOL),
    (torch.bfloat16, True, True, BF16_TOL),
])
def test_decode_path_error_against_fp32(vae_and_reference, dtype, channels_last, compiled, tol):
    vae, latents, ref = vae_and_reference
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = prepare_decode(copy.deepcopy(vae), dtype, channels_last=channels_last, compile=compiled)
    with torch.no_grad():
        out = fast.decode(latents)
    # the compiled path really ran compiled graphs (and the others none)
    assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled
    assert out.dtype == dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    print(f"{dtype}, channels_last={channels_last}, compiled={compiled}: rel. L2 vs fp32 {err:.2e}")
    assert err <= tol, err
    if channels_last:
        conv = next(p for p in fast.parameters() if p.dim() == 5)
        assert conv.is_contiguous(memory_format=torch.channels_last_3d)


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="VAE decode dtype must be"):
        prepare_decode(torch.nn.Linear(2, 2), torch.int8)
