"""Rectified-flow (flow matching) objective for Wan TI2V and the 1X world model.

    x_t = (1 - sigma) * x0 + sigma * noise,   the model predicts v = noise - x0,   timestep = 1000 * sigma.

TI2V / world-model conditioning keeps the first K latent frames of a sample clean: they are x0 in x_t,
their tokens get timestep 0 (per-token timesteps, as the release samples), and they are left out of the
loss. K = 1 is TI2V's image; K = 5 is the 1X set-up (17 context frames = 5 latent frames); K = 0 is T2V.
K is per sample, so a share of each batch can train plain T2V.

Everything here is pure tensor math on given random draws (``torch.Generator`` in, tensors out): who
draws what (identical over the TP / CP ranks of a replica, different across DP ranks) is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_SAMPLERS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """How training draws sigma and conditions a sample.

    sigma_sampler: "uniform" (U(0, 1)) or "logit_normal" (sigmoid of N(logit_mean, logit_std)).
    shift: time shift applied after drawing, sigma' = shift * sigma / (1 + (shift - 1) * sigma); 1 = none.
    clean_frames: K, the latent frames kept clean (timestep 0) and out of the loss.
    t2v_fraction: share of samples trained as T2V (K = 0 for them).
    text_dropout: share of samples whose text is replaced by the empty prompt (classifier-free guidance).
    """

    sigma_sampler: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    clean_frames: int = 1
    t2v_fraction: float = 0.0
    text_dropout: float = 0.0

    def __post_init__(self):
        if self.sigma_sampler not in SIGMA_SAMPLERS:
            raise ValueError(f"sigma_sampler must be one of {SIGMA_SAMPLERS}, got {self.sigma_sampler!r}")
        if self.shift <= 0 or self.logit_std <= 0:
            raise ValueError(f"shift and logit_std must be > 0 (got {self.shift}, {self.logit_std})")
        if self.clean_frames < 0:
            raise ValueError(f"clean_frames must be >= 0, got {self.clean_frames}")
        for name in ("t2v_fraction", "text_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's time shift: more weight on high noise for shift > 1 (the release samples with shift 5)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(batch: int, cfg: FlowMatchingConfig, generator: torch.Generator) -> torch.Tensor:
    """[batch] float32 sigmas in (0, 1), drawn on the CPU from ``generator``."""
    if cfg.sigma_sampler == "uniform":
        sigma = torch.rand(batch, generator=generator, dtype=torch.float64)
    else:
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator,
                                                                           dtype=torch.float64))
    return shift_sigma(sigma, cfg.shift).float()


def clean_frame_counts(batch: int, cfg: FlowMatchingConfig, generator: torch.Generator) -> torch.Tensor:
    """[batch] int64 K per sample: ``cfg.clean_frames``, or 0 for the T2V share."""
    k = torch.full((batch,), cfg.clean_frames, dtype=torch.int64)
    if cfg.t2v_fraction > 0:
        k[torch.rand(batch, generator=generator) < cfg.t2v_fraction] = 0
    return k


def _frame_index(num_frames: int, device) -> torch.Tensor:
    return torch.arange(num_frames, device=device)


def loss_frame_mask(clean: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, F] bool: True for the latent frames that are noised and scored (frame index >= K)."""
    return _frame_index(num_frames, clean.device)[None, :] >= clean[:, None]


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """x_t for latents [B, C, F, H, W]; the first ``clean[b]`` frames of sample b stay x0."""
    s = sigma.to(x0.dtype).view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    keep = ~loss_frame_mask(clean.to(x0.device), x0.shape[2])
    return torch.where(keep[:, None, :, None, None], x0, x_t)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def token_timesteps(sigma: torch.Tensor, clean: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Per-token timesteps [B, f*h*w] (fp32) for a token grid (f, h, w) in (frame, row, col) order.

    Tokens of a clean latent frame get 0, the others 1000 * sigma. (Wan's patch is 1 in time, so token
    frame = latent frame.) Timesteps stay fp32: bf16 would round 998.4 to 1000.
    """
    f, h, w = grid
    t = (sigma.float() * NUM_TRAIN_TIMESTEPS)[:, None].expand(-1, f).clone()
    t[~loss_frame_mask(clean.to(t.device), f)] = 0.0
    return t.repeat_interleave(h * w, dim=1)


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """Mean squared error of the predicted velocity over the noised frames only.

    ``reduction="mean"`` averages over every scored element of the batch; ``"none"`` returns the
    per-sample mean [B] (a sample with nothing to score gives 0).
    """
    mask = loss_frame_mask(clean.to(pred.device), pred.shape[2])[:, None, :, None, None]
    err = (pred.float() - velocity_target(x0, noise).float()).square() * mask
    per_elem = mask.expand_as(err).flatten(1).sum(1).clamp_min(1)
    if reduction == "none":
        return err.flatten(1).sum(1) / per_elem
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return err.sum() / per_elem.sum()


def apply_text_dropout(text: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each sample's text [B, L, D] by the empty-prompt embedding ``empty`` [L', D] with probability p.

    Wan's unconditional branch is the umT5 encoding of "" (zero-padded to the text length), not zeros.
    """
    if p <= 0:
        return text
    drop = torch.rand(text.shape[0], generator=generator) < p
    if not drop.any():
        return text
    blank = text.new_zeros(text.shape[1:])
    n = min(empty.shape[0], text.shape[1])
    blank[:n] = empty[:n].to(text.dtype)
    return torch.where(drop.to(text.device)[:, None, None], blank[None], text)
