"""Flow-matching objective (megawan.diffusion) against per-sample, per-frame loops written out by hand."""

from __future__ import annotations


import pytest
import torch

from megawan.diffusion import (FlowMatchingConfig, apply_text_dropout, clean_frame_counts, flow_matching_loss,
                               noisy_latents, sample_sigmas, shift_sigma, token_timesteps)


def test_shift_matches_the_release_formula():
    for s in (0.0, 0.25, 0.5, 0.999, 1.0):
        assert shift_sigma(torch.tensor(s), 5.0).item() == pytest.approx(5 * s / (1 + 4 * s))
    assert torch.equal(shift_sigma(torch.tensor([0.3]), 1.0), torch.tensor([0.3]))


@pytest.mark.parametrize("sampler", ["uniform", "logit_normal"])
def test_sigma_samplers_have_the_stated_distribution(sampler):
    cfg = FlowMatchingConfig(sigma_sampler=sampler, logit_mean=0.5, logit_std=0.8)
    s = sample_sigmas(200_000, cfg, torch.Generator().manual_seed(0)).double()
    assert 0 < s.min() and s.max() < 1
    if sampler == "uniform":
        assert s.mean().item() == pytest.approx(0.5, abs=5e-3)
        assert s.var().item() == pytest.approx(1 / 12, abs=2e-3)
    else:
        logit = torch.log(s / (1 - s))
        assert logit.mean().item() == pytest.approx(0.5, abs=1e-2)
        assert logit.std().item() == pytest.approx(0.8, abs=1e-2)


def test_same_generator_same_draws_and_t2v_share():
    cfg = FlowMatchingConfig(clean_frames=5, t2v_fraction=0.25)
    a = clean_frame_counts(40_000, cfg, torch.Generator().manual_seed(3))
    b = clean_frame_counts(40_000, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert set(a.tolist()) == {0, 5}
    assert (a == 0).double().mean().item() == pytest.approx(0.25, abs=1e-2)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(3, 4, 5, 2, 3, generator=g), torch.randn(3, 4, 5, 2, 3, generator=g)
    sigma = torch.tensor([0.9, 0.4, 0.05])
    clean = torch.tensor([1, 0, 3])
    return x0, noise, sigma, clean


def test_noisy_latents_timesteps_and_loss_against_loops():
    x0, noise, sigma, clean = _case()
    x_t = noisy_latents(x0, noise, sigma, clean)
    t = token_timesteps(sigma, clean, (5, 1, 3))  # 5 frames of 3 tokens
    pred = torch.randn_like(x0)
    num, den = 0.0, 0
    for b in range(3):
        for f in range(5):
            if f < clean[b]:
                assert torch.equal(x_t[b, :, f], x0[b, :, f])
                assert (t[b, 3 * f:3 * f + 3] == 0).all()
            else:
                want = (1 - sigma[b]) * x0[b, :, f] + sigma[b] * noise[b, :, f]
                torch.testing.assert_close(x_t[b, :, f], want)
                assert torch.allclose(t[b, 3 * f:3 * f + 3], sigma[b] * 1000)
                err = pred[b, :, f] - (noise[b, :, f] - x0[b, :, f])
                num += err.square().sum().item()
                den += err.numel()
    assert flow_matching_loss(pred, x0, noise, clean).item() == pytest.approx(num / den, rel=1e-6)
    perfect = noise - x0
    assert flow_matching_loss(perfect, x0, noise, clean).item() == 0.0
    per_sample = flow_matching_loss(pred, x0, noise, clean, reduction="none")
    b = 2
    err = (pred[b, :, 3:] - (noise[b, :, 3:] - x0[b, :, 3:])).square().mean()
    assert per_sample[b].item() == pytest.approx(err.item(), rel=1e-6)


def test_text_dropout_uses_the_empty_prompt_not_zeros():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(64, 7, 4)
    empty = torch.randn(3, 4)
    out = apply_text_dropout(text, empty, 0.5, g)
    dropped = [b for b in range(64) if not torch.equal(out[b], text[b])]
    assert 16 < len(dropped) < 48
    for b in dropped:
        assert torch.equal(out[b, :3], empty) and (out[b, 3:] == 0).all()
    assert apply_text_dropout(text, empty, 0.0, g) is text


@pytest.mark.parametrize("bad", [dict(sigma_sampler="cosine"), dict(shift=0), dict(clean_frames=-1),
                                 dict(t2v_fraction=1.5), dict(text_dropout=-0.1)])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        FlowMatchingConfig(**bad)
