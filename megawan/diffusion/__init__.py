"""The diffusion objective and solvers, shared by the trainer, the sampler and the evaluator."""

from megawan.diffusion.flow_matching import (FlowMatchingConfig, apply_text_dropout, clean_frame_counts,
                                             flow_matching_loss, loss_frame_mask, noisy_latents, sample_sigmas,
                                             shift_sigma, token_timesteps, velocity_target)
from megawan.diffusion.solvers import FlowEuler, FlowUniPC, flow_sigmas, make_solver

__all__ = ["FlowEuler", "FlowUniPC", "flow_sigmas", "make_solver", "FlowMatchingConfig", "apply_text_dropout", "clean_frame_counts", "flow_matching_loss",
           "loss_frame_mask", "noisy_latents", "sample_sigmas", "shift_sigma", "token_timesteps",
           "velocity_target"]
