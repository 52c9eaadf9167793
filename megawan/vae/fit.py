"""Fitting a VAE38 to videos: the training loop of the tiny VAE that reconstructs the sample world.

The model is ``WanVAE38`` itself: the loop runs its chunked passes (``encode_moments`` / ``decode_raw``, the
code ``encode`` / ``decode`` run under ``no_grad``) with gradients, unsharded. Per step, for a batch of clips
x [B, 3, T, H, W] in [-1, 1]:

    mu, logvar = encode_moments(x)                      raw posterior moments, [B, z_dim, F, h, w] each
    z          = mu + exp(logvar / 2) * eps             the reparameterised sample, eps ~ N(0, I)
    loss       = mean((decode(z) - x)^2) + kl_weight * mean(KL(N(mu, exp(logvar)) || N(0, I)))

both means over every element (pixels x channels x frames; latent elements): the reconstruction term is the
per-pixel MSE that PSNR measures, the KL term (kl_weight 1e-4 by default: about 1-3 % of the loss at the
end of a fit) keeps the posterior's scale bounded and its samples noisy, so the decoder learns to tolerate
latents that are not exactly an encoder's output (what a DiT produces). AdamW, linear warm-up then cosine,
gradients clipped by their global norm.

After the fit, ``set_latent_normalisation`` sets the config's per-channel ``latents_mean`` / ``latents_std``
(the release's config fields) to the statistics of the fitted encoder's means, so ``encode`` returns
unit-scale latents for the DiT and ``decode`` undoes it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megawan.vae.model import SPATIAL_FACTOR, WanVAE38
from megawan.vae.partition import SpatialPartition


@dataclass(frozen=True)
class VAEFitConfig:
    steps: int = 3000
    batch_size: int = 4
    lr: float = 2e-3
    min_lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    kl_weight: float = 1e-4
    clip_grad: float = 1.0
    seed: int = 0
    eval_every: int = 250  # held-out PSNR every N steps (and at the end); 0 = only at the end

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def random_crops(clips: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``crop`` x ``crop`` window per clip of ``clips`` [B, 3, T, H, W] (the same window in every frame
    of a clip, each clip its own, drawn from ``generator``): [B, 3, T, crop, crop].

    Why: the VAE's convolutions are translation-equivariant, so a window trains the same weights on every frame
    of the causal chain at a fraction of a full frame's cost. The windows' offsets are multiples of 16 px (the
    VAE's spatial factor), so a window's latent grid is aligned with the full frame's. The mid block's spatial
    attention sees a smaller field on a window: a fit should end on full frames.
    """
    h, w = clips.shape[-2:]
    if crop % SPATIAL_FACTOR or not SPATIAL_FACTOR <= crop <= min(h, w):
        raise ValueError(f"crop {crop} must be a multiple of {SPATIAL_FACTOR} px within the {h} x {w} frames")
    rows = torch.randint(0, (h - crop) // SPATIAL_FACTOR + 1, (len(clips),), generator=generator) * SPATIAL_FACTOR
    cols = torch.randint(0, (w - crop) // SPATIAL_FACTOR + 1, (len(clips),), generator=generator) * SPATIAL_FACTOR
    return torch.stack([c[..., r:r + crop, q:q + crop] for c, r, q in zip(clips, rows.tolist(), cols.tolist())])


def _whole_frame(video: torch.Tensor) -> SpatialPartition:
    return SpatialPartition.single(video.shape[3] // SPATIAL_FACTOR, video.shape[4] // SPATIAL_FACTOR)


def reconstruct(vae: WanVAE38, video: torch.Tensor, generator: torch.Generator | None = None):
    """(reconstruction [B, 3, T, H, W], mu, logvar) with gradients; a posterior sample is decoded when a
    generator is given, the mean otherwise."""
    part = _whole_frame(video)
    mu, logvar = vae.encode_moments(video, part).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # the release's clamp of the posterior's log-variance
    z = mu
    if generator is not None:
        eps = torch.randn(mu.shape, generator=generator).to(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
    return torch.cat(list(vae.decode_raw(z, part)), dim=2), mu, logvar


def vae_loss(vae: WanVAE38, video: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple:
    """(loss, reconstruction MSE, KL per latent element) of one batch; see the module docstring."""
    recon, mu, logvar = reconstruct(vae, video, generator)
    mse = (recon - video).square().mean()
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()
    return mse + kl_weight * kl, mse, kl


def frame_psnr(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per frame of videos [B, 3, T, H, W] in [-1, 1], on their 8-bit frames (as the 1X metric:
    megawan.evaluation.metrics.psnr gives the same numbers; the VAE does not import the evaluation package)."""
    def to8(v):
        return ((v.float().clamp(-1, 1) + 1) * 127.5).round().double()

    mse = (to8(pred) - to8(true)).square().mean(dim=(1, 3, 4))
    return 10 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruction_psnr(vae: WanVAE38, clips: Sequence[torch.Tensor]) -> float:
    """Mean PSNR (dB, 8-bit frames) of ``decode(encode(clip))`` over every frame of ``clips`` ([3, T, H, W] each),
    through the public (normalised) encode / decode: what training and sampling see."""
    was_training = vae.training
    vae.eval()
    scores = []
    try:
        for clip in clips:
            recon = vae.decode(vae.encode(clip[None]))
            scores.append(frame_psnr(recon, clip[None]).flatten())
    finally:
        vae.train(was_training)
    return torch.cat(scores).mean().item()


@torch.no_grad()
def latent_statistics(vae: WanVAE38, clips: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the encoder's raw posterior means over ``clips``."""
    mus = [vae.encode_moments(c[None], _whole_frame(c[None]))[:, : vae.config.z_dim] for c in clips]
    flat = torch.cat([m.transpose(0, 1).flatten(1) for m in mus], dim=1).double()  # [z_dim, N]
    return flat.mean(1).tolist(), flat.std(1).tolist()


def set_latent_normalisation(vae: WanVAE38, clips: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Set ``vae.config.latents_mean / latents_std`` from the fitted encoder's statistics (returns them)."""
    mean, std = latent_statistics(vae, clips)
    vae.config = dataclasses.replace(vae.config, latents_mean=tuple(round(m, 6) for m in mean),
                                     latents_std=tuple(round(s, 6) for s in std))
    return mean, std


def start_posterior_narrow(vae: WanVAE38, logvar: float) -> None:
    """Set the bias of the log-variance half of ``quant_conv`` (the encoder's last layer) to ``logvar``.

    Why: a fresh encoder's means have a standard deviation of ~0.13 while its log-variances are ~0, so the
    sampled z is ~99 % noise: the decoder learns to ignore z and the fit stalls at the mean image (measured:
    18.4 dB after 1,650 steps, every reconstruction the same blur). A narrow posterior at the start lets the
    encoder's signal through; the KL term then widens it as far as reconstruction allows.
    """
    z = vae.config.z_dim
    with torch.no_grad():
        vae.quant_conv.bias[z:].fill_(logvar)


def fit(vae: WanVAE38, batches: Callable[[int], torch.Tensor], held_out: Sequence[torch.Tensor],
        config: VAEFitConfig = VAEFitConfig(), log: Callable[[str], None] | None = print,
        on_eval: Callable[[list[dict], WanVAE38], None] | None = None) -> list[dict]:
    """Train ``vae`` in place. ``batches(step)`` returns the step's clips [B, 3, T, H, W] in [-1, 1];
    ``held_out`` clips are scored (``reconstruction_psnr``, with the config's current normalisation) before the
    first step, every ``eval_every`` steps and at the end, when ``on_eval(history, vae)`` is also called with the
    history so far, whose last row is that step's (e.g. to write a snapshot). Returns the history: one dict per logged step."""
    generator = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = [{"step": 0, "held_out_psnr": reconstruction_psnr(vae, held_out)}]
    if log:
        log(f"step 0: held-out reconstruction PSNR {history[0]['held_out_psnr']:.2f} dB (start)")
    vae.train().requires_grad_(True)
    start = time.perf_counter()
    running = []
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        loss, mse, kl = vae_loss(vae, batches(step), config.kl_weight, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.clip_grad)
        opt.step()
        running.append((loss.item(), mse.item(), kl.item()))
        done = step + 1
        if done == config.steps or (config.eval_every and done % config.eval_every == 0):
            n = len(running)
            row = {"step": done, "loss": sum(r[0] for r in running) / n, "mse": sum(r[1] for r in running) / n,
                   "kl": sum(r[2] for r in running) / n, "lr": config.lr_at(step),
                   "held_out_psnr": reconstruction_psnr(vae, held_out), "seconds": time.perf_counter() - start}
            history.append(row)
            running = []
            if log:
                log(f"step {done}: loss {row['loss']:.5f} (mse {row['mse']:.5f}, kl {row['kl']:.3f}), "
                    f"held-out PSNR {row['held_out_psnr']:.2f} dB, lr {row['lr']:.2e}, {row['seconds']:.0f} s")
            if on_eval is not None:
                on_eval(history, vae)
    vae.eval().requires_grad_(False)
    return history
