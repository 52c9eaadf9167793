"""Sampling pipelines: the denoising loop (CFG, TI2V / world-model pinning), generation end to end, video out."""

from megawan.pipelines.pipeline import Request, WanSampler, check_request
from megawan.pipelines.sampling import SamplingConfig, denoise, initial_noise

__all__ = ["Request", "SamplingConfig", "WanSampler", "check_request", "denoise", "initial_noise"]
