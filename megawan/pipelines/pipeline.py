"""TI2V / T2V / world-model generation end to end: check the request, encode the condition with the sharded
VAE, denoise over the TP x CP replica, decode sharded and stream to mp4 + PNG contact sheet + settings JSON.

    pipe = WanSampler(model, vae, groups)
    out = pipe.generate(Request(text=emb, image=img, frames=121, seed=0), "out/video.mp4", null_text=empty_emb)

``check_request`` raises before any model work; ``WanSampler.generate`` must be called by every rank of a
replica with the same request (DP replicas pass different requests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megawan.vae.model import SPATIAL_FACTOR, TEMPORAL_FACTOR
from megawan.pipelines.sampling import SamplingConfig, denoise, initial_noise
from megawan.pipelines.video_out import _is_writer, write_video

WORLD_MODEL_CONTEXT = 17  # 1X: frames x0..x16 given = 5 latent frames


@dataclass
class Request:
    """One video to generate.

    text [Lt, text_dim] (the prompt's umT5 embedding; zeros [0 or more, text_dim] for no prompt).
    image [3, H, W] in [-1, 1] (TI2V), or context [3, T, H, W] in [-1, 1] (world model: its first
    ``context_frames`` frames are kept), or neither (T2V: then give height and width).
    states [frames, state_dim] for a state-conditioned model. frames: output length (4n + 1).
    """

    text: torch.Tensor
    image: torch.Tensor | None = None
    context: torch.Tensor | None = None
    states: torch.Tensor | None = None
    frames: int = 121
    height: int | None = None
    width: int | None = None
    context_frames: int = WORLD_MODEL_CONTEXT
    seed: int = 0
    meta: dict = field(default_factory=dict)  # written to the settings JSON (prompt, input files, ...)


def pixel_multiple(model_config) -> int:
    """Height and width must be multiples of this: the VAE's 16 x the DiT's spatial patch (2) = 32."""
    ph, pw = model_config.patch_size[1:]
    if ph != pw:
        raise ValueError(f"non-square patch {model_config.patch_size} is not supported")
    return SPATIAL_FACTOR * ph


def _size_rule(m: int) -> str:
    return (f"height and width must be multiples of {m} pixels (VAE 16 x patch {m // SPATIAL_FACTOR}), e.g. "
            f"704x1280 or 1280x704 (the release's), 512x512 (1X)")


def check_size(size: tuple[int, int], model_config, given: str = "size") -> None:
    """A size asked for (``given`` names where it came from, e.g. ``--size``) that the model can sample."""
    m = pixel_multiple(model_config)
    h, w = size
    if h <= 0 or w <= 0 or h % m or w % m:
        near = "x".join(str(max(m, round(v / m) * m)) for v in (h, w))
        raise ValueError(f"{given} {h}x{w}: {_size_rule(m)}; the nearest is {near}")


def check_request(req: Request, model_config) -> tuple[int, int]:
    """Validate a request against the model before any work; returns (height, width)."""
    m = pixel_multiple(model_config)
    sizes = f"{_size_rule(m)}; resize or crop the input first"
    if req.frames < 1 or (req.frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(f"frames must be 4n + 1 (e.g. 77, 121), got {req.frames}")
    if req.image is not None and req.context is not None:
        raise ValueError("give an image (TI2V) or a context clip (world model), not both")
    if req.image is not None:
        if req.image.ndim != 3 or req.image.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W], got {tuple(req.image.shape)}")
        h, w = req.image.shape[1:]
    elif req.context is not None:
        if req.context.ndim != 4 or req.context.shape[0] != 3:
            raise ValueError(f"context clip must be [3, T, H, W], got {tuple(req.context.shape)}")
        k = req.context_frames
        if k < 1 or (k - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"context_frames must be 4n + 1 (17 for 1X), got {k}")
        if req.context.shape[1] < k:
            raise ValueError(f"context clip has {req.context.shape[1]} frames; at least {k} are needed "
                             f"({(k - 1) // TEMPORAL_FACTOR + 1} latent frames kept clean)")
        if k >= req.frames:
            raise ValueError(f"frames ({req.frames}) must exceed the context frames ({k})")
        h, w = req.context.shape[2:]
    else:
        if req.height is None or req.width is None:
            raise ValueError("T2V (no image, no context) needs height and width")
        h, w = req.height, req.width
    if (req.height is not None and req.height != h) or (req.width is not None and req.width != w):
        raise ValueError(f"the input is {h}x{w} (HxW) but {req.height}x{req.width} was asked for; {sizes}")
    if h % m or w % m or h == 0 or w == 0:
        raise ValueError(f"input is {h}x{w} (HxW); {sizes}")
    text = req.text
    if text.ndim != 2 or text.shape[1] != model_config.text_dim or text.shape[0] > model_config.text_len:
        raise ValueError(f"text must be [<= {model_config.text_len}, {model_config.text_dim}] (the prompt's umT5 "
                         f"embedding), got {tuple(text.shape)}")
    sd = model_config.state_dim
    if req.states is not None:
        if not sd:
            raise ValueError("states were given but the model has no state conditioning (config state_dim = 0)")
        if tuple(req.states.shape) != (req.frames, sd):
            raise ValueError(f"states must be [frames, state_dim] = [{req.frames}, {sd}] (one row per output "
                             f"frame, context frames included), got {tuple(req.states.shape)}")
    elif sd:
        raise ValueError(f"this world model (state_dim = {sd}) needs states [{req.frames}, {sd}]")
    return int(h), int(w)


class WanSampler:
    """Generation with one model replica (TP x CP ranks); the VAE is sharded over ``groups.vae_group``."""

    def __init__(self, model, vae, groups, config: SamplingConfig = SamplingConfig()):
        self.model, self.vae, self.groups, self.config = model.eval(), vae, groups, config

    def condition_latents(self, req: Request) -> torch.Tensor | None:
        """The clean first latent frames [1, C, K, h, w]: the image (K = 1) or the context clip's first frames."""
        if req.image is not None:
            video = req.image[:, None]
        elif req.context is not None:
            video = req.context[:, : req.context_frames]
        else:
            return None
        dev = self.groups.device
        return self.vae.encode(video[None].to(dev), self.groups.vae_group, gather_output=True).float()

    def sample(self, req: Request, null_text: torch.Tensor | None = None, progress: bool = True,
               cond_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [1, C, F, h, w] for one request (same on every rank of the replica). ``cond_latents``: the
        request's clean latent frames when the caller already encoded them (skips the encode)."""
        h, w = check_request(req, self.model.config)
        cfg, dev = self.model.config, self.groups.device
        cond = self.condition_latents(req) if cond_latents is None else cond_latents.to(dev).float()
        shape = (1, cfg.in_channels, (req.frames - 1) // TEMPORAL_FACTOR + 1, h // SPATIAL_FACTOR, w // SPATIAL_FACTOR)
        noise = initial_noise(shape, [req.seed]).to(dev)
        text = req.text[None].to(dev)
        null = None if null_text is None else null_text.reshape(1, -1, cfg.text_dim).to(dev)
        states = None if req.states is None else req.states[None].float().to(dev)
        return denoise(self.model, noise, text, null, cond_latents=cond, states=states, config=self.config,
                       progress=progress)

    def generate(self, req: Request, out_path, null_text: torch.Tensor | None = None, *, fps: float = 24.0,
                 progress: bool = True) -> dict:
        """Sample, then decode to ``out_path`` (.mp4) + .png contact sheet + .json settings (rank 0 writes)."""
        latents = self.sample(req, null_text, progress)
        info = write_video(self.vae, latents, out_path, self.groups.vae_group, fps=fps, progress=progress)
        info.update(seed=req.seed, frames_requested=req.frames, sampling=self.config.to_dict(),
                    mode="world_model" if req.context is not None else "ti2v" if req.image is not None else "t2v",
                    guidance_applied=null_text is not None and self.config.guidance != 1.0,
                    layout={"tp": self.groups.tp, "cp": self.groups.cp, "dp": self.groups.dp,
                            "cp_impl": self.groups.cp_impl}, **req.meta)
        if _is_writer(self.groups.vae_group):
            Path(out_path).with_suffix(".json").write_text(json.dumps(info, indent=2, default=str))
        return info
