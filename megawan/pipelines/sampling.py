"""The denoising loop: T2V, TI2V and world-model rollouts with classifier-free guidance.

``denoise`` runs on every rank of a TP x CP replica with the same inputs: the DiT shards tokens over the
replica and returns the complete velocity on every rank, and the solver math is elementwise, so every rank of
a replica holds the same latents after each step. Noise is drawn on the CPU from the seed of each sample
(``initial_noise``), so a sample's video does not depend on the layout or on which DP rank drew it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from megawan.diffusion.solvers import SCHEDULES, SOLVERS, flow_sigmas, make_solver

CFG_MODES = ("batched", "sequential")


@dataclass(frozen=True)
class SamplingConfig:
    """Release defaults: 50 UniPC steps (order 2, bh2, x0-prediction), shift 5, guidance 5, batched CFG."""

    steps: int = 50
    shift: float = 5.0
    solver: str = "unipc"
    order: int = 2
    variant: str = "bh2"
    schedule: str = "release"
    guidance: float = 5.0
    cfg: str = "batched"  # one forward on [cond; uncond], or two forwards

    def __post_init__(self):
        if self.steps < 1 or self.shift <= 0 or self.order < 1:
            raise ValueError(f"steps and order must be >= 1 and shift > 0 (got {self.steps}, {self.order}, "
                             f"{self.shift})")
        for name, allowed in (("solver", SOLVERS), ("schedule", SCHEDULES), ("cfg", CFG_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")

    def to_dict(self) -> dict:
        return asdict(self)


def initial_noise(shape, seeds: list[int]) -> torch.Tensor:
    """[B, ...] standard normal noise; sample b drawn from its own CPU generator seeded ``seeds[b]``."""
    if len(seeds) != shape[0]:
        raise ValueError(f"one seed per sample: {len(seeds)} seeds for batch {shape[0]}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def frame_timesteps(t: float, clean: int, grid: tuple[int, int, int], batch: int, device) -> torch.Tensor:
    """Per-token timesteps [B, f*h*w] fp32: the first ``clean`` latent frames at 0, the others at t."""
    f, h, w = grid
    per_frame = torch.full((f,), float(t), dtype=torch.float32, device=device)
    per_frame[:clean] = 0.0
    return per_frame.repeat_interleave(h * w)[None].expand(batch, -1)


class Progress:
    """Progress and ETA on one line, printed by rank 0 only, about every ``every`` units and at the end."""

    def __init__(self, total: int, what: str, every: int = 1, enabled: bool | None = None):
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.total, self.what, self.every = total, what, max(1, every)
        self.enabled = rank0 if enabled is None else enabled and rank0
        self.start = time.perf_counter()
        self.next = self.every

    def update(self, done: int) -> None:
        if not self.enabled or (done < self.next and done != self.total):
            return
        self.next = (done // self.every + 1) * self.every
        spent = time.perf_counter() - self.start
        eta = spent / done * (self.total - done)
        print(f"[{self.what}] {done}/{self.total}  {spent:.1f}s elapsed, ETA {eta:.1f}s", flush=True)


def _pad_text(text: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [B, L, D] to ``length`` tokens (the DiT pads to its text_len the same way)."""
    if text.shape[1] >= length:
        return text
    return torch.cat([text, text.new_zeros(text.shape[0], length - text.shape[1], text.shape[2])], dim=1)


def guided_velocity(model, x, t, text, null_text, guidance: float, mode: str, states=None):
    """v = v_uncond + g (v_cond - v_uncond); one model call when g == 1 or there is no unconditional text."""
    if null_text is None or guidance == 1.0:
        return model(x, t, text, states)
    if mode == "batched":
        n = max(text.shape[1], null_text.shape[1])
        both = torch.cat([_pad_text(text, n), _pad_text(null_text.expand(text.shape[0], -1, -1), n)])
        v = model(torch.cat([x, x]), torch.cat([t, t]), both, None if states is None else torch.cat([states, states]))
        cond, uncond = v.chunk(2)
    else:
        cond = model(x, t, text, states)
        uncond = model(x, t, null_text.expand(text.shape[0], -1, -1), states)
    return uncond + guidance * (cond - uncond)


@torch.no_grad()
def denoise(model, noise: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor | None = None, *,
            cond_latents: torch.Tensor | None = None, states: torch.Tensor | None = None,
            config: SamplingConfig = SamplingConfig(), progress: bool = False) -> torch.Tensor:
    """Integrate the flow ODE from ``noise`` [B, C, F, H, W] to latents.

    text [B, Lt, text_dim]; null_text [1 or B, Lt', text_dim], the unconditional (empty-prompt) embedding for
    CFG (None: no guidance). cond_latents [B, C, K, H, W]: the clean first K latent frames (TI2V: K = 1, the
    image latent; world model: K = 5), pinned before every model call and after every step, with their tokens
    at timestep 0. states [B, T, state_dim] for a state-conditioned model (given to both CFG branches).
    """
    x = noise.float().clone()
    k = 0
    if cond_latents is not None:
        k = cond_latents.shape[2]
        cond_latents = cond_latents.to(x)
        x[:, :, :k] = cond_latents
    sigmas, timesteps = flow_sigmas(config.steps, config.shift, config.schedule)
    solver = make_solver(config.solver, sigmas, config.order, config.variant)
    pt, ph, pw = model.config.patch_size
    grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    bar = Progress(config.steps, "denoise", every=max(1, config.steps // 10), enabled=progress)
    for i, t in enumerate(timesteps.tolist()):
        tt = frame_timesteps(t, k, grid, x.shape[0], x.device)
        v = guided_velocity(model, x, tt, text, null_text, config.guidance, config.cfg, states)
        x = solver.step(v.float(), x)
        if k:
            x[:, :, :k] = cond_latents
        bar.update(i + 1)
    return x
