"""Bad inputs and unavailable fast paths fail early with errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from megawan.layers.attention_kernels import check_backend
from megawan.layers.linear import resolve_linear_impl
from megawan.models.dit import DiTRuntime, WanDiT
from tests.dit_fixtures import TINY, make_case, model_output

RT = DiTRuntime(linear_impl="local")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return WanDiT(TINY, runtime=RT).eval()


@pytest.mark.parametrize("mutate, message", [
    (lambda x, t, c: (x[:, :47], t, c), r"latents must be \[B, 48, F, H, W\]"),
    (lambda x, t, c: (x[0], t, c), r"latents must be \[B, 48, F, H, W\]"),
    (lambda x, t, c: (x[..., :7], t, c), r"latent W=7 is not divisible by patch size 2"),
    (lambda x, t, c: (x, t[:, :-1], c), r"timestep must be \[B\]=2 or per-token \[B, L\]=\[2, 36\]"),
    (lambda x, t, c: (x, t[:1, :], c), r"timestep must be"),
    (lambda x, t, c: (x, t, torch.cat([c, c[:, :1]], 1)), r"text must be \[B=2, <= 512, 64\]"),
    (lambda x, t, c: (x, t, c[..., :32]), r"text must be"),
])
def test_wrong_shapes_are_named(model, mutate, message):
    x, t, text = mutate(*make_case(3, 6, 8, True))
    with pytest.raises(ValueError, match=message):
        model(x, t, text)


def test_short_prompt_is_zero_padded_to_512(model):
    x, t, text = make_case(3, 6, 8, True)
    full = model_output(model, (x, t, text))
    short = model_output(model, (x, t, text[:, :23]))  # the case's prompt has 23 tokens, then zeros
    assert torch.equal(full, short)


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_inputs_on_another_device_are_named(model, moved):
    """Each input must sit on the model's device; 'meta' stands in for a second device on any machine."""
    case = [v.to(model.patch_embedding.weight.device) for v in make_case(3, 6, 8, True)]
    case[moved] = case[moved].to("meta")
    name = ("latents", "timestep", "text")[moved]
    with pytest.raises(ValueError, match=rf"{name} is on meta but the model is on .*move the inputs"):
        model(*case)


def test_gpu_paths_requested_without_gpu_name_what_is_missing():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ImportError, match="flash-attn"):
        check_backend("flash")
    with pytest.raises(ImportError, match="Transformer Engine"):
        check_backend("te")
    with pytest.raises(ImportError, match="Transformer Engine"):
        resolve_linear_impl("te")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        check_backend("xformers")
    assert resolve_linear_impl("auto") == "local"  # the clean fallback
