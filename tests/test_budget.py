"""megawan.training.budget against the model itself: parameter counts from the built WanDiT's parameters
(and their TP attributes), FLOPs from torch's FlopCounterMode on a real forward / backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from megawan.models.dit import DiTRuntime, WanDiT
from megawan.models.dit_config import WanDiTConfig
from megawan.testing import run_distributed
from megawan.training.budget import (_recomputing_block_bytes_per_token, dit_flops, dit_param_counts,
                                     estimate_memory)

TINY = WanDiTConfig.load("tiny")
RELEASE = WanDiTConfig.load("wan2.2-ti2v-5b")
# a second shape, every width different from the tiny preset's, so no term of the formula hides
OTHER = dataclasses.replace(TINY, dim=192, num_heads=8, ffn_dim=320, num_layers=3, text_dim=48, text_len=40,
                            freq_dim=64, in_channels=16, out_channels=12)
RT = DiTRuntime(linear_impl="local", attention_backend="torch")


def _split_and_replicated(model) -> tuple[int, int]:
    split = sum(p.numel() for p in model.parameters() if getattr(p, "tensor_model_parallel", False))
    return split, sum(p.numel() for p in model.parameters()) - split


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, state_dim=25), OTHER,
                                 dataclasses.replace(OTHER, state_dim=7, frames_per_latent=3)],
                         ids=["tiny", "tiny_states", "other", "other_states"])
def test_param_counts_are_the_models(cfg):
    assert dit_param_counts(cfg) == _split_and_replicated(WanDiT(cfg, runtime=RT))


def _local_counts(cfg):
    from megawan import parallel_state

    groups = parallel_state.initialize(2, 1)
    return _split_and_replicated(WanDiT(cfg, groups, RT))


def test_split_params_are_divided_over_tp_ranks():
    cfg = dataclasses.replace(TINY, state_dim=25)
    split, replicated = dit_param_counts(cfg)
    for local in run_distributed(_local_counts, 2, cfg, timeout_s=180):
        assert local == (split // 2, replicated)


def test_released_model_has_its_published_parameter_count():
    split, replicated = dit_param_counts(WanDiTConfig())
    assert split + replicated == 4_999_787_712


def test_weight_bytes_are_the_models():
    """bf16 GEMM weights, fp32 everything else: the estimate's weights are the built model's bytes."""
    model = WanDiT(TINY, runtime=DiTRuntime(dtype=torch.bfloat16, linear_impl="local"))
    est = estimate_memory(TINY, tokens=16, batch=1, tp=1, cp=1, dp=1, compute_bytes=2)
    assert est.weights == sum(p.numel() * p.element_size() for p in model.parameters())


# torch's CPU attention kernel has no FLOP formula registered; give it torch's own SDPA formulas
def _sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad, q, k, v)


_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


def _counted(model, cfg, frames, size, backward, device):
    g = torch.Generator().manual_seed(0)
    b = 2
    x = torch.randn(b, cfg.in_channels, frames, size, size, generator=g).to(device)
    tokens = frames * (size // 2) ** 2
    t = torch.full((b, tokens), 500.0, device=device)  # per-token timesteps, as training uses
    text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g).to(device)
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        out = model(x, t, text)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops(), tokens, b


@pytest.mark.parametrize("cfg", [TINY, OTHER], ids=["tiny", "other"])
@pytest.mark.parametrize("frames,size", [(3, 4), (5, 8)])
def test_forward_flops_equal_torchs_count(cfg, frames, size, device):
    """Forward: torch counts every matmul (2 x m x n x k; the patch embedding, text / time MLPs, q/k/v/o,
    FFN, head) and the attention cores (SDPA: QK^T and PV); dit_flops counts the same terms by formula,
    so the two agree exactly (norms, softmax and element-wise ops are in neither)."""
    torch.manual_seed(0)
    counted, tokens, b = _counted(WanDiT(cfg, runtime=RT).eval(), cfg, frames, size, False, device)
    assert counted == dit_flops(cfg, tokens, batch=b, backward=False)


@pytest.mark.parametrize("cfg", [TINY, OTHER], ids=["tiny", "other"])
def test_training_flops_are_three_forwards_within_2_percent(cfg, device):
    """Forward + backward: dit_flops uses the 3 x forward convention (MFU as Megatron reports it).
    torch counts the real backward: no input gradient for the first layers (latents, text and sinusoid
    inputs need none: fewer) and 2.5 x forward for the attention cores (more); within 2% here."""
    torch.manual_seed(0)
    counted, tokens, b = _counted(WanDiT(cfg, runtime=RT), cfg, 5, 8, True, device)
    assert counted == pytest.approx(dit_flops(cfg, tokens, batch=b), rel=0.02)


# ---- activations kept for backward ---------------------------------------------------------------

def _held_bytes(cfg, runtime, latent_h: int) -> int:
    """Bytes a training forward leaves allocated (kept for backward, plus the output), CPU profiler: the
    model is built on the CPU whatever the machine (``device`` fixture's exception)."""
    from megawan import parallel_state

    on_cpu = dataclasses.replace(parallel_state.get_groups(), device=torch.device("cpu"))
    torch.manual_seed(0)
    model = WanDiT(cfg, on_cpu, runtime).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 3, latent_h, 8, generator=g)
    t = torch.full((1,), 500.0)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x, t, text)
    del out
    return sum(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("granularity", ["full", "selective"])
@pytest.mark.parametrize("dtype, stream", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)])
def test_recomputing_blocks_keep_what_the_estimate_says(granularity, dtype, stream):
    """Bytes kept per token per block, measured as the growth of what a forward leaves allocated with one
    more block (layers 1 -> 2) and more tokens (latent 3 x 8 x 8 -> 3 x 16 x 8: 48 -> 96 tokens), equal
    the estimate's figure exactly."""
    cfg = dataclasses.replace(TINY, num_layers=1)
    rt = DiTRuntime(dtype=dtype, residual_dtype=stream, linear_impl="local", attention_backend="torch",
                    activation_checkpointing=True, recompute_granularity=granularity)
    held = {(layers, h): _held_bytes(dataclasses.replace(cfg, num_layers=layers), rt, h)
            for layers in (1, 2) for h in (8, 16)}
    per_block = {h: held[(2, h)] - held[(1, h)] for h in (8, 16)}
    tokens = {h: 3 * (h // 2) * 4 for h in (8, 16)}
    measured = (per_block[16] - per_block[8]) / (tokens[16] - tokens[8])
    expected = _recomputing_block_bytes_per_token(cfg, granularity, dtype.itemsize, stream.itemsize)
    assert measured == expected, (measured, expected)


def test_estimate_counts_granularity_blocks_and_stream():
    kw = dict(tokens=27280, batch=1, tp=1, cp=1, dp=8)
    full = estimate_memory(RELEASE, recompute="full", **kw).activations
    sel = estimate_memory(RELEASE, recompute="selective", **kw).activations
    none = estimate_memory(RELEASE, **kw).activations
    half = estimate_memory(RELEASE, recompute="full", recompute_num_blocks=15, **kw).activations
    bf16_stream = estimate_memory(RELEASE, recompute="full", residual_bytes=2, **kw).activations
    assert full < sel < none
    assert half == pytest.approx((full + none) / 2, rel=0.05)
    # 30 blocks' fp32 inputs become bf16: 30 x 2 bytes x D x L less
    assert full - bf16_stream == 30 * 2 * RELEASE.dim * 27280
