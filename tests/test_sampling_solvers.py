"""Flow solvers: UniPC parity with diffusers' UniPCMultistepScheduler (flow mode), the release's schedule and
model timesteps, and exactness of both solvers on a perfectly straight flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megawan.diffusion.solvers import FlowEuler, FlowUniPC, flow_sigmas

SHAPE = (2, 3, 4, 5)
_A = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * 0.3


def fixed_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'velocity' of the sample and the timestep (so history terms matter)."""
    return torch.tanh(x) * (t / 1000) + _A.to(x.dtype) * torch.cos(t / 300)


# Wan 2.2's scheduler config as diffusers ships it (scheduler_config.json of the -Diffusers release)
WAN_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction",
                            solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                            final_sigmas_type="zero")


def release_sigma_max() -> float:
    """The release scheduler's first sigma: entry 0 of its training table, built as its __init__ builds it
    (1 - linspace(1, 1/1000, 1000) reversed, stored as a float32 tensor, read back with .item())."""
    table = 1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    return torch.from_numpy(table).to(torch.float32)[0].item()


def diffusers_unipc(steps, shift, schedule, order=2):
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(**{**WAN_SCHEDULER_CONFIG, "solver_order": order}, flow_shift=shift)
    if schedule == "release":  # the release's unshifted spacing from its table's start; diffusers shifts
        ref.set_timesteps(sigmas=np.linspace(release_sigma_max(), 0.0, steps + 1)[:-1])
    else:
        ref.set_timesteps(steps)
    return ref


def run_both(steps, shift, schedule, dtype, order=2):
    ref = diffusers_unipc(steps, shift, schedule, order)
    sigmas, timesteps = flow_sigmas(steps, shift, schedule)
    if dtype == torch.float64:  # diffusers then computes its coefficients in float64 too
        ref.sigmas = ref.sigmas.double()
    ours = FlowUniPC(sigmas.to(dtype) if dtype == torch.float64 else sigmas, order=order)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        assert float(t) == timesteps[i].item()  # the model sees the same timesteps
        y = ref.step(fixed_model(y, t.to(dtype)), t, y).prev_sample
        x = ours.step(fixed_model(x, timesteps[i].to(dtype)), x)
    return x, y, sigmas, ref


@pytest.mark.parametrize("steps,shift,schedule", [(50, 5.0, "release"), (12, 3.0, "release"),
                                                  (20, 5.0, "diffusers"), (3, 5.0, "release")])
def test_unipc_matches_diffusers_within_1e6(steps, shift, schedule):
    x, y, sigmas, ref = run_both(steps, shift, schedule, torch.float32)
    assert torch.equal(ref.sigmas, sigmas)  # the same sigma schedule, bit for bit
    assert (x - y).abs().max().item() <= 1e-6 * max(1.0, y.abs().max().item())
    x, y, _, _ = run_both(steps, shift, schedule, torch.float64)
    assert (x - y).abs().max().item() <= 1e-12


def test_unipc_order3_matches_diffusers():
    x, y, _, _ = run_both(15, 5.0, "release", torch.float64, order=3)
    assert (x - y).abs().max().item() <= 1e-12


def test_release_timesteps_match_the_released_scheduler_over_a_grid():
    """Sigmas and model timesteps of every schedule of 1-100 steps x shift 1-6 equal the released scheduler's
    own (diffusers' UniPC in Wan's config, started where the release's float32 table starts). A start of
    exactly 0.999 hands the model a timestep one lower in 28 of these 600 schedules."""
    for steps in range(1, 101):
        for shift in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
            ref = diffusers_unipc(steps, shift, "release")
            sigmas, timesteps = flow_sigmas(steps, shift)
            assert timesteps.tolist() == [float(t) for t in ref.timesteps.tolist()], (steps, shift)
            assert torch.equal(sigmas, ref.sigmas), (steps, shift)
    assert flow_sigmas(3, 1.0)[1].tolist() == [999.0, 666.0, 333.0]  # exactly 0.999 would give 665, 332


def test_release_schedule_and_timesteps():
    """The release: linspace(float32(0.999), 0) unshifted, shift, trailing 0; timesteps int64(1000 sigma) from float64."""
    steps, shift = 50, 5.0
    base = np.linspace(release_sigma_max(), 0, steps + 1)[:-1]
    shifted = shift * base / (1 + (shift - 1) * base)
    sigmas, timesteps = flow_sigmas(steps, shift)
    assert torch.equal(sigmas, torch.tensor(np.append(shifted, 0.0), dtype=torch.float32))
    assert timesteps.tolist() == [float(int(v)) for v in shifted * 1000]
    assert timesteps[0].item() == 999.0 and sigmas[0].item() < 1.0  # starts below 1: log(sigma/(1-sigma)) finite
    # diffusers' own spacing starts at 1 (nudged by 1e-6): a different schedule
    d_sigmas, _ = flow_sigmas(steps, shift, "diffusers")
    assert abs(d_sigmas[0].item() - (1 - 1e-6)) < 1e-7 and not torch.equal(d_sigmas, sigmas)


@pytest.mark.parametrize("solver", [FlowUniPC, FlowEuler])
def test_straight_flow_lands_on_its_data_point(solver):
    """For the exact velocity of one data point, v = (x - x0) / sigma, both solvers must end at x0."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sigmas, _ = flow_sigmas(10, 5.0)
    s = solver(sigmas.double())
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for sig in sigmas[:-1].tolist():
        x = s.step((x - x0) / sig, x)
    assert (x - x0).abs().max().item() < 1e-10


def test_solver_refuses_extra_steps_and_bad_settings():
    sigmas, _ = flow_sigmas(2)
    s = FlowUniPC(sigmas)
    x = torch.zeros(SHAPE)
    s.step(x, x)
    s.step(x, x)
    with pytest.raises(RuntimeError, match="all were taken"):
        s.step(x, x)
    with pytest.raises(ValueError, match="variant"):
        FlowUniPC(sigmas, variant="bh3")
    with pytest.raises(ValueError, match="schedule"):
        flow_sigmas(5, schedule="karras")
