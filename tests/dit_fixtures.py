"""A tiny random diffusers WanTransformer3DModel (the independent reference) and test inputs."""

from __future__ import annotations

import torch

from megawan.models.dit_config import WanDiTConfig

TINY = WanDiTConfig.load("tiny")


def make_diffusers_reference(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=TINY.patch_size, num_attention_heads=TINY.num_heads, attention_head_dim=TINY.head_dim,
        in_channels=TINY.in_channels, out_channels=TINY.out_channels, text_dim=TINY.text_dim,
        freq_dim=TINY.freq_dim, ffn_dim=TINY.ffn_dim, num_layers=TINY.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=TINY.eps,
    )
    with torch.no_grad():  # diffusers initialises biases to 0 and norms to 1: perturb every parameter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref.eval()


def make_case(frames: int, height: int, width: int, per_token: bool, batch: int = 2, seed: int = 1):
    """(latents, timestep, text). Per-token t puts latent frame 0 at t = 0 (TI2V), the rest at t."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY.in_channels, frames, height, width, generator=g)
    t_scalar = torch.tensor([937.5, 250.0][:batch])
    if per_token:
        per_frame = (height // 2) * (width // 2)
        t = t_scalar[:, None].repeat(1, frames * per_frame)
        t[:, :per_frame] = 0.0
    else:
        t = t_scalar
    text = torch.zeros(batch, TINY.text_len, TINY.text_dim)
    text[:, :23] = torch.randn(batch, 23, TINY.text_dim, generator=g)  # zero-padded prompt, as the release
    return x, t, text


def run_reference(ref, case):
    x, t, text = case
    with torch.no_grad():
        return ref(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def model_output(model, case) -> torch.Tensor:
    """Run megawan's model on ``case`` with the inputs on the model's device; the output back on CPU."""
    device = model.patch_embedding.weight.device
    with torch.no_grad():
        return model(*(v.to(device) for v in case)).cpu()
