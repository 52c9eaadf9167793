"""Rank functions for the sampling / evaluation multi-process tests (spawned by run_distributed)."""

from __future__ import annotations

import torch

from megawan import parallel_state
from megawan.models.dit import WanDiT
from megawan.vae.model import WanVAE38
from megawan.pipelines.pipeline import WanSampler
from megawan.pipelines.sampling import SamplingConfig
from megawan.pipelines.video_out import decode_frames, to_uint8
from tests.sampling_fixtures import RT


def sample_layout(jobs, tp, cp, null_text, config: SamplingConfig):
    """For each (checkpoint root, requests) job: sample every request on a TP x CP replica and decode sharded.
    Returns [[(latents, uint8 frames) per request] per job]."""
    groups = parallel_state.initialize(tp, cp)
    out = []
    for root, requests in jobs:
        model = WanDiT.from_pretrained(root, groups=groups, runtime=RT)
        vae = WanVAE38.from_pretrained(root / "Wan2.2_VAE.pth", device=groups.device)
        sampler = WanSampler(model, vae, groups, config)
        done = []
        for req in requests:
            lat = sampler.sample(req, null_text, progress=False)
            frames = torch.cat([to_uint8(f) for f in decode_frames(vae, lat, groups.vae_group)])
            done.append((lat.cpu(), frames))
        out.append(done)
    return out


def rollouts_layout(root, tp, cp, clips, config: SamplingConfig):
    from megawan.evaluation import evaluate_rollouts

    groups = parallel_state.initialize(tp, cp)
    model = WanDiT.from_pretrained(root, groups=groups, runtime=RT)
    vae = WanVAE38.from_pretrained(root / "Wan2.2_VAE.pth", device=groups.device)
    return evaluate_rollouts(model, vae, clips, groups, config=config)
