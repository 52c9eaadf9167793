"""Flow-matching ODE solvers for sampling: UniPC (the release's) and Euler.

The sample follows x_sigma = (1 - sigma) x0 + sigma noise from sigma ~ 1 down to 0; the model predicts the
velocity v = noise - x0 at timestep 1000 sigma. A solver is built for one sigma schedule and stepped once per
model call: ``x = solver.step(v, x)``.

Schedule (``flow_sigmas``). The release (Wan 2.2's FlowUniPCMultistepScheduler) spaces ``steps`` sigmas
linearly from its training table's largest sigma to 0 (exclusive), applies the time shift, and appends a
final 0. That table is float32, so the start is float32(1 - 1/1000) = 0.99900001287..., not 0.999: the
difference moves 1000 sigma across an integer in some schedules (steps 3, shift 1: 999, 666, 333 where a
start of exactly 0.999 gives 999, 665, 332), so megawan starts from the float32 value as the release does.
diffusers' UniPCMultistepScheduler(use_flow_sigmas=True) spaces them from 1.0 to 1/1000 instead (then nudges a first sigma of exactly 1 down by 1e-6). megawan follows the release
(``schedule="release"``): released weights were tuned and published with it; ``schedule="diffusers"`` gives
diffusers' spacing. The timesteps fed to the model are the release's: 1000 sigma computed in float64 and
truncated to an integer (its ``.to(torch.int64)``), while the solver steps with the float32 sigmas.

UniPC here is the multistep predictor-corrector of Zhao et al. (2023) in its data-prediction form: the model
output is turned into x0 = x - sigma v, the predictor UniP-p extrapolates from the last p x0 estimates in
lambda = log((1 - sigma) / sigma), and the corrector UniC refines each new sample with the model output just
computed at it. Order 2 with the B(h) = e^h - 1 variant ("bh2") is the release's setting.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megawan.diffusion.flow_matching import NUM_TRAIN_TIMESTEPS, shift_sigma

SCHEDULES = ("release", "diffusers")
# The release's first sigma: the largest entry of its float32 training table 1 - linspace(1, 1/1000, 1000)
RELEASE_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))
SOLVERS = ("unipc", "euler")


def flow_sigmas(steps: int, shift: float = 5.0, schedule: str = "release") -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1] float32 ending in 0, model timesteps [steps] float32 holding whole numbers)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if schedule == "release":
        base = np.linspace(RELEASE_SIGMA_MAX, 0.0, steps + 1)[:-1]
    elif schedule == "diffusers":
        base = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps + 1)[:-1]
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    sig = shift_sigma(base, shift)
    if schedule == "diffusers" and abs(sig[0] - 1.0) < 1e-6:
        sig[0] -= 1e-6  # diffusers keeps log(sigma / (1 - sigma)) finite at the first step
    timesteps = torch.from_numpy((sig * NUM_TRAIN_TIMESTEPS).astype(np.int64)).float()
    sigmas = torch.from_numpy(np.append(sig, 0.0).astype(np.float32))
    return sigmas, timesteps


def _lam(sigma: float) -> float:
    """log-SNR half: lambda = log(alpha / sigma) with alpha = 1 - sigma (inf at sigma = 0)."""
    return math.inf if sigma == 0 else math.log1p(-sigma) - math.log(sigma)


class FlowEuler:
    """First-order step along the predicted velocity: x <- x + (sigma_next - sigma) v."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = [float(s) for s in sigmas]
        self.index = 0

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        s, s_next = self.sigmas[self.index], self.sigmas[self.index + 1]
        self.index += 1
        return sample + (s_next - s) * velocity


class FlowUniPC:
    """UniPC in data (x0) prediction for flow matching; stateful, one ``step`` per model call.

    order: predictor order p (the corrector then has order p + 1); variant: "bh2" (B(h) = e^h - 1) or "bh1"
    (B(h) = h). lower_order_final: the last steps use order <= steps left (always true for the very last step,
    which lands on sigma = 0, where only x0 itself is defined). Coefficients are computed in float64.
    """

    def __init__(self, sigmas: torch.Tensor, order: int = 2, variant: str = "bh2", lower_order_final: bool = True):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
        self.sigmas = [float(s) for s in sigmas]
        self.order, self.variant, self.lower_order_final = order, variant, lower_order_final
        self.index = 0
        self.x0_history: list[torch.Tensor] = []  # newest last; at most `order` kept
        self.prev_sample: torch.Tensor | None = None  # the sample the last predictor started from
        self.prev_order = 0

    # ---- coefficients -------------------------------------------------------------------------------
    def _phis(self, h: float, p: int) -> tuple[float, float, list[float]]:
        """(e^-h - 1, B(h), b[1..p]) for a step of log-SNR length h (data prediction runs in -h)."""
        hh = -h
        phi1 = math.expm1(hh)
        big_b = phi1 if self.variant == "bh2" else hh
        b, phi_k, fact = [], phi1 / hh - 1.0, 1
        for k in range(1, p + 1):  # phi_{k+1}(hh) * k! / B(h), built by the phi recurrence
            b.append(phi_k * fact / big_b)
            fact *= k + 1
            phi_k = phi_k / hh - 1.0 / fact
        return phi1, big_b, b

    def _ratios(self, s0: int, p: int, h: float) -> list[float]:
        """r_k = (lambda(sigma_{s0-k}) - lambda(sigma_{s0})) / h for the k = 1..p-1 older estimates."""
        lam0 = _lam(self.sigmas[s0])
        return [(_lam(self.sigmas[s0 - k]) - lam0) / h for k in range(1, p)]

    def _update(self, x: torch.Tensor, s0: int, p: int, m_new: torch.Tensor | None) -> torch.Tensor:
        """Advance sample x from sigma index s0 to s0 + 1 with the last p x0 estimates (the newest belongs to s0).

        m_new None: predictor UniP-p. m_new given (x0 estimated at the new point): corrector UniC-p.
        """
        sig0, sig1 = self.sigmas[s0], self.sigmas[s0 + 1]
        m0 = self.x0_history[-1]
        if sig1 == 0.0:  # h = inf: the ODE ends at the data estimate
            return m0.clone()
        h = _lam(sig1) - _lam(sig0)
        alpha1 = 1.0 - sig1
        phi1, big_b, b = self._phis(h, p)
        rks = self._ratios(s0, p, h)
        diffs = [(self.x0_history[-1 - k] - m0) / r for k, r in enumerate(rks, start=1)]
        out = (sig1 / sig0) * x - (alpha1 * phi1) * m0
        if m_new is None:
            if not diffs:
                return out
            # order 2 uses rho = 1/2 (the paper's choice); higher orders solve the Vandermonde system
            rho = [0.5] if p == 2 else np.linalg.solve(np.vander(rks, increasing=True).T, b[:-1]).tolist()
            res = sum(r * d for r, d in zip(rho, diffs))
            return out - (alpha1 * big_b) * res
        if p == 1:
            rho = [0.5]
        else:
            rho = np.linalg.solve(np.vander(rks + [1.0], increasing=True).T, b).tolist()
        res = rho[-1] * (m_new - m0)
        for r, d in zip(rho[:-1], diffs):
            res = res + r * d
        return out - (alpha1 * big_b) * res

    # ---- stepping -----------------------------------------------------------------------------------
    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One model output (velocity at ``sample``, sigma index ``self.index``) -> the next sample."""
        i = self.index
        if i >= len(self.sigmas) - 1:
            raise RuntimeError(f"the schedule has {len(self.sigmas) - 1} steps; all were taken")
        x0 = sample - self.sigmas[i] * velocity
        if i > 0:  # correct the sample just predicted with the model output at it
            sample = self._update(self.prev_sample, i - 1, self.prev_order, x0)
        self.x0_history = (self.x0_history + [x0])[-self.order:]
        p = min(self.order, len(self.x0_history))  # warm-up: as many estimates as exist
        if self.lower_order_final:
            p = min(p, len(self.sigmas) - 1 - i)
        self.prev_sample, self.prev_order = sample, p
        self.index += 1
        return self._update(sample, i, p, None)


def make_solver(name: str, sigmas: torch.Tensor, order: int = 2, variant: str = "bh2"):
    if name == "unipc":
        return FlowUniPC(sigmas, order=order, variant=variant)
    if name == "euler":
        return FlowEuler(sigmas)
    raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")
