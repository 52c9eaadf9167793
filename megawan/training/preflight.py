"""The trainer's pre-flight memory check, from the run config alone (nothing is built, no data is read but a latent
cache's index): the one function both the trainer (``trainer.check_memory``, before it builds the model) and the
layout planner (``python -m megawan.plan``) call, so a layout the planner marks as not fitting is the one the trainer
refuses, with the same figures.

    check = memory_check(cfg, model_config(cfg), world=32, device_type="cuda", capacity=80 * GIB)
    check.fits, check.estimate.describe(), check.reserve.describe(), check.refusal()
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megawan.models.dit_config import WanDiTConfig
from megawan.parallel_state.layout import ParallelLayout
from megawan.training.budget import (GIB, DeviceReserve, MemoryEstimate, device_reserve, estimate_memory,
                                     suggest_layout, vae_encode_bytes)
from megawan.training.config import TrainConfig


class MemoryBudgetError(RuntimeError):
    """The layout needs more memory per rank than the device (or host) has."""


def model_config(cfg: TrainConfig) -> WanDiTConfig:
    """The DiT a run trains: ``model.init``'s config.json (or a preset name), else ``model.dit``."""
    base = WanDiTConfig.load(cfg.model.init or cfg.model.dit)
    return dataclasses.replace(base, state_dim=cfg.model.state_dim) if cfg.model.state_dim else base


def tokens_per_sample(dit: WanDiTConfig, shape) -> int:
    """Video tokens of one sample whose latents are ``shape`` = (F, h, w)."""
    f, h, w = shape
    pt, ph, pw = dit.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def data_parallel_communicators(tp: int, cp: int, world: int) -> int:
    """Process groups of more than one rank megawan communicates over: TP, CP, DP, DP x CP, the VAE's (TP x CP)
    and the world."""
    dp = world // (tp * cp)
    return sum(n > 1 for n in (tp, cp, dp, dp * cp, tp * cp, world))


def memory_reserve(cfg: TrainConfig, world: int, device, capacity: float) -> DeviceReserve:
    """What this rank needs beyond the model's estimate (``budget.device_reserve``): NCCL's buffers for each
    group of more than one rank megawan communicates over, and the VAE ``data.vae`` names when the data encodes
    on the fly (its own parameters: the tiny presets' few MiB, the release's 2.6 GiB). ``device``: a
    torch.device or its type ("cuda", "cpu")."""
    device_type = getattr(device, "type", device)
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    vae = 0.0
    if cfg.data.source == "1x":
        import torch

        from megawan.training.data import SOURCE_SIZE_1X
        from megawan.vae.model import WanVAE38
        from megawan.vae.pretrained import vae_config

        vae_cfg = vae_config(cfg.data.vae)
        with torch.device("meta"):
            params = sum(p.numel() for p in WanVAE38(vae_cfg).parameters())
        height, width = cfg.data.size or SOURCE_SIZE_1X
        vae = vae_encode_bytes(params, vae_cfg.base_dim, cfg.data.clip_frames, height, width, tp * cp)
    return device_reserve(device_type, capacity, data_parallel_communicators(tp, cp, world), vae)


@dataclass
class MemoryCheck:
    """One rank's memory for a run config: the model's estimate, the reserve beyond it, the capacity."""
    cfg: TrainConfig
    dit: WanDiTConfig
    world: int
    device_type: str
    capacity: float
    tokens: int
    estimate: MemoryEstimate
    reserve: DeviceReserve

    @property
    def total(self) -> float:
        return self.estimate.total + self.reserve.total

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def estimate_kwargs(self) -> dict:
        return _estimate_kwargs(self.cfg, self.tokens)

    def summary(self) -> str:
        return (f"memory estimate per rank: {self.estimate.describe()} + reserve {self.reserve.describe()} of "
                f"{self.capacity / GIB:.1f} GiB")

    def refusal(self) -> str:
        """Why the layout does not fit, and a layout of the same ranks that does (``budget.suggest_layout``)."""
        par = self.cfg.parallel
        fit = suggest_layout(self.dit, self.world, self.capacity - self.reserve.total, **self.estimate_kwargs())
        hint = (f"a layout that fits: --parallel.tp {fit[0]} --parallel.cp {fit[1]}"
                + (f" --parallel.cp_impl {par.cp_impl}" if par.cp_impl != "ulysses" else "")
                + (f" --parallel.ulysses_size {par.ulysses_size}" if par.ulysses_size else "")
                + (f" --model.activation_checkpointing true --model.recompute_granularity {fit[2]}" if fit[2]
                   else "")) if fit else \
            "no layout of these ranks fits: use more ranks, a smaller batch or shorter clips"
        return (f"tp={par.tp} x cp={par.cp} on {self.world} ranks needs about {self.estimate.describe()} per rank "
                f"({self.tokens} tokens x batch {self.cfg.data.batch_size}) + a reserve of {self.reserve.describe()}, "
                f"more than the {self.capacity / GIB:.1f} GiB this rank has ({self.device_type}); {hint}")


def _estimate_kwargs(cfg: TrainConfig, tokens: int) -> dict:
    return dict(tokens=tokens, batch=cfg.data.batch_size, compute_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
                residual_bytes=2 if cfg.model.residual_dtype == "bfloat16" else 4,
                ema=cfg.optim.ema_decay > 0, sequence_parallel=cfg.parallel.sequence_parallel,
                cp_impl=cfg.parallel.cp_impl, ulysses_size=cfg.parallel.ulysses_size)


def memory_check(cfg: TrainConfig, dit: WanDiTConfig, world: int, device_type: str, capacity: float,
                 latent: tuple[int, int, int] | None = None) -> MemoryCheck:
    """Per-rank memory of ``cfg`` on ``world`` ranks of ``capacity`` bytes each. ``latent``: one sample's
    latent shape (F, h, w); None reads it from the data config (a latent cache's index, or the clip size)."""
    from megawan.training.data import latent_shape

    tokens = tokens_per_sample(dit, latent or latent_shape(cfg.data))
    par = cfg.parallel
    recompute = cfg.model.recompute_granularity if cfg.model.activation_checkpointing else None
    est = estimate_memory(dit, tp=par.tp, cp=par.cp, dp=world // (par.tp * par.cp), recompute=recompute,
                          recompute_num_blocks=cfg.model.recompute_num_blocks, **_estimate_kwargs(cfg, tokens))
    reserve = memory_reserve(cfg, world, device_type, capacity)
    return MemoryCheck(cfg, dit, world, device_type, capacity, tokens, est, reserve)


def preflight(cfg: TrainConfig, world: int, device_type: str, capacity: float) -> MemoryCheck:
    """What the trainer checks before it builds anything: the layout's rules (``ParallelLayout.validate``, as
    ``parallel_state.initialize`` enforces them) and the memory; raises LayoutError or MemoryBudgetError."""
    dit = model_config(cfg)
    par = cfg.parallel
    ParallelLayout(world, par.tp, par.cp, par.cp_impl, par.ulysses_size).validate(dit.num_heads)
    check = memory_check(cfg, dit, world, device_type, capacity)
    if not check.fits:
        raise MemoryBudgetError(check.refusal())
    return check
