"""World-model evaluation: PSNR / SSIM and rollouts on held-out clips (the 1X sampling metric)."""

from megawan.evaluation.metrics import psnr, ssim
from megawan.evaluation.rollouts import evaluate_rollouts, log_to_tensorboard

__all__ = ["evaluate_rollouts", "log_to_tensorboard", "psnr", "ssim"]
