"""The DiT backend: built once, shared by every layer, kernels are submodules sized for their calls."""

from __future__ import annotations

import pytest
import torch

from megawan.layers.attention_kernels import AttentionKernel, _installed
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.testing import run_distributed
from tests.dit_fixtures import TINY, make_case


def _heads_seen(tp: int, cp: int):
    """On every rank: (heads the kernel was built for, heads its forward received) per kernel."""
    from megawan import parallel_state

    groups = parallel_state.initialize(tp, cp)
    torch.manual_seed(0)
    model = WanDiT(TINY, groups, DiTRuntime(linear_impl="local")).eval()
    seen = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AttentionKernel):
            mod.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, (m.num_heads,
                                                                                             args[0].shape[2])))
    x, t, text = make_case(2, 4, 4, per_token=False, batch=1)
    with torch.no_grad():
        model(x, t, text)
    return seen


@pytest.mark.parametrize("tp, cp", [(2, 1), (1, 2)])
def test_kernels_are_submodules_sized_for_their_heads(tp, cp):
    for seen in run_distributed(_heads_seen, 2, tp, cp):
        # Self-attention sees heads/(tp*cp) after Ulysses; cross-attention heads/tp.
        assert seen == {f"blocks.{i}.{layer}.kernel": (n, n) for i in range(TINY.num_layers)
                        for layer, n in (("self_attn", TINY.num_heads // (tp * cp)),
                                         ("cross_attn", TINY.num_heads // tp))}


def test_every_linear_takes_the_one_backend_config():
    torch.manual_seed(0)
    model = WanDiT(TINY, runtime=DiTRuntime(linear_impl="local"))
    mp = model.backend.mp_config
    for block in model.blocks:
        for layer in (block.self_attn.qkv, block.self_attn.o, block.cross_attn.q, block.ffn.fc1, block.ffn.fc2):
            assert layer.config is mp
    assert model.backend.linear_impl == "local" and model.backend.cp_group is None


def test_te_kernel_is_a_submodule():
    if not (_installed("transformer_engine") and torch.cuda.is_available()):
        pytest.skip("Transformer Engine and a CUDA device are needed for the TE attention kernel")
    kernel = AttentionKernel("te", 4, 16)
    assert any(type(m).__name__ == "DotProductAttention" for m in kernel.modules())
    q = torch.randn(8, 1, 4, 16, device="cuda", dtype=torch.bfloat16)
    ref = AttentionKernel("torch", 4, 16)(q, q, q)
    torch.testing.assert_close(kernel.cuda()(q, q, q), ref, atol=2e-2, rtol=2e-2)
