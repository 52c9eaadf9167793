"""VAE38: the Wan 2.2 TI2V-5B video VAE (48 latent channels, 4 x 16 x 16 compression), shardable in space.

``WanVAE38.encode`` / ``decode`` take an optional process group. With a group of N ranks each rank computes
one tile of every frame (horizontal bands by default, or a ``rows x cols`` grid): 3x3 convs exchange 1-row
halos with neighbours, the mid attention all-gathers K/V, and everything else (norms, 1x1 convs, the
parameter-free shortcuts, the temporal caches) is tile-local. The result equals the unsharded VAE up to
fp32 rounding. Inference only: both calls run under ``torch.no_grad``. See docs/vae.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megawan import presets
from megawan.checkpoint.vae_io import locate_checkpoint, read_state_dict, write_diffusers, write_official
from megawan.checkpoint.vae_keys import detect_layout, to_external, to_internal
from megawan.utils import group_size
from megawan.vae.blocks import DownStage, MidBlock, UpStage
from megawan.vae.conv import CausalConv3d, StreamContext
from megawan.vae.norm import RMSNorm
from megawan.vae.partition import CommStats, SpatialPartition

# Per-channel statistics of the released VAE's latents: normalised = (mu - mean) / std.
LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

PATCH = 2                 # 2x2 pixel patches folded into channels before the encoder
SPATIAL_FACTOR = 16       # patch 2 x three 2x downsamples
TEMPORAL_FACTOR = 4       # two 2x temporal downsamples
ENCODE_CHUNK = 4          # frames per encoder call after frame 0


@dataclass(frozen=True)
class WanVAE38Config:
    """Architecture of the VAE; defaults are the released Wan 2.2 VAE (704,688,668 parameters)."""

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        if len(self.dim_mult) != 4 or tuple(self.temporal_downsample) != (False, True, True):
            raise ValueError("VAE38 has 4 stages with temporal_downsample (False, True, True); "
                             f"got dim_mult={self.dim_mult}, temporal_downsample={self.temporal_downsample}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need z_dim={self.z_dim} entries")

    @classmethod
    def preset(cls, name: str) -> WanVAE38Config:
        """A preset shipped with the package: "tiny" (tests) or "wan2.2-ti2v-5b"."""
        return cls(**presets.load("vae38", name))

    @classmethod
    def tiny(cls) -> WanVAE38Config:
        """Same structure, small widths: for tests on CPU (the "tiny" preset)."""
        return cls.preset("tiny")

    @property
    def image_channels(self) -> int:
        return 3


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[b, c, t, h*2, w*2] -> [b, c*4, t, h, w], channels ordered (c, col offset, row offset)."""
    b, c, t, h, w = video.shape
    x = video.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    b, cp, t, h, w = x.shape
    x = x.view(b, cp // (PATCH * PATCH), PATCH, PATCH, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cp // (PATCH * PATCH), t, h * PATCH, w * PATCH)


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAE38Config):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(cfg.image_channels * PATCH * PATCH, dims[0], 3)
        self.stages = nn.ModuleList(
            DownStage(dims[i], dims[i + 1], cfg.num_res_blocks, downsample=i != last,
                      temporal=i != last and cfg.temporal_downsample[i])
            for i in range(len(cfg.dim_mult)))
        self.mid = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3)

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        x = self.conv_in(x, ctx)
        for stage in self.stages:
            x = stage(x, ctx)
        x = self.mid(x, ctx)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), ctx)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAE38Config):
        super().__init__()
        dims = [cfg.decoder_base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.mid = MidBlock(dims[0])
        self.stages = nn.ModuleList(
            UpStage(dims[i], dims[i + 1], cfg.num_res_blocks + 1, upsample=i != last,
                    temporal=i != last and temporal_upsample[i])
            for i in range(len(cfg.dim_mult)))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.image_channels * PATCH * PATCH, 3)

    def forward(self, x: torch.Tensor, ctx: StreamContext) -> torch.Tensor:
        x = self.conv_in(x, ctx)
        x = self.mid(x, ctx)
        for stage in self.stages:
            x = stage(x, ctx)
        return self.conv_out(F.silu(self.norm_out(x), inplace=True), ctx)


def _time_chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Frame 0 alone, then chunks of ``size`` frames (the release's causal chunking)."""
    return [x[:, :, :1], *(x[:, :, 1:].split(size, dim=2) if x.shape[2] > 1 else ())]


def _gather_shapes(shape: torch.Size, group, device) -> list[tuple[int, ...]]:
    mine = torch.tensor(list(shape), dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(group_size(group))]
    dist.all_gather(every, mine, group=group)
    return [tuple(int(v) for v in s.tolist()) for s in every]


def plan_partition(shape: torch.Size, group, *, factor: int, grid=None, band_input=False,
                   stats: CommStats | None = None, device=None) -> SpatialPartition:
    """The tiles for a ``[b, c, t, h, w]`` input (``factor`` = its pixels per latent row: 16 or 1).

    Ranks first agree on b, c, t (and, for full inputs, h and w), so a mismatch fails loudly on every
    rank instead of hanging a later exchange.
    """
    b, c, t, h, w = shape
    if group_size(group) == 1:
        return SpatialPartition.single(h // factor, w // factor, stats)
    grid = SpatialPartition.resolve_grid(group, grid)
    shapes = _gather_shapes(shape, group, device)
    if any(s[:3] != shapes[0][:3] for s in shapes):
        raise ValueError(f"ranks of the VAE group disagree on batch/channels/frames: {[s[:3] for s in shapes]}")
    if band_input:
        return SpatialPartition.from_tile_sizes(group, [(s[3] // factor, s[4] // factor) for s in shapes], grid, stats)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"band_input=False expects the same full input on every rank, got shapes {shapes}; "
                         f"pass band_input=True to give each rank only its tile")
    return SpatialPartition.even(group, h // factor, w // factor, grid, stats)


class WanVAE38(nn.Module):
    """Wan 2.2 VAE: ``encode(video in [-1, 1]) -> normalised latents``, ``decode(latents) -> video``."""

    def __init__(self, config: WanVAE38Config | None = None):
        super().__init__()
        self.config = config or WanVAE38Config()
        z = self.config.z_dim
        self.encoder = Encoder(self.config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder(self.config)

    # ---- latent normalisation ----------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    # ---- the chunked passes (differentiable: encode / decode wrap them in no_grad; fitting calls them) ----
    def encode_moments(self, video: torch.Tensor, part: SpatialPartition) -> torch.Tensor:
        """This rank's video tile [B, 3, T, H, W] -> raw posterior moments [B, 2 z_dim, (T-1)/4+1, h, w]
        (mean, then log-variance; not normalised), frame 0 alone and then chunks of 4 frames."""
        param = self.quant_conv.weight
        x = patchify(video.to(device=param.device, dtype=param.dtype))
        ctx = StreamContext(part)
        moments = []
        for chunk in _time_chunks(x, ENCODE_CHUNK):
            moments.append(self.quant_conv(self.encoder(chunk, ctx), ctx))
            ctx.first_chunk = False
        return torch.cat(moments, dim=2)

    def decode_raw(self, z: torch.Tensor, part: SpatialPartition, frames_per_step: int = 1):
        """Yield the video tile [B, 3, n, H, W] (not clamped) for raw (un-normalised) latents [B, z_dim, T, h, w],
        one latent frame (1 video frame), then ``frames_per_step`` latent frames (4 each) at a time."""
        ctx = StreamContext(part)
        for step in _time_chunks(z, frames_per_step):
            out = self.decoder(self.post_quant_conv(step, ctx), ctx)
            ctx.first_chunk = False
            yield unpatchify(out)

    # ---- encode ------------------------------------------------------------------------------------
    def _check_video(self, video: torch.Tensor, band_input: bool) -> None:
        what = "video band" if band_input else "video"
        if not torch.is_tensor(video) or video.dim() != 5:
            raise ValueError(f"{what} must be a [B, 3, T, H, W] tensor, got {getattr(video, 'shape', type(video))}")
        _, c, t, h, w = video.shape
        if c != self.config.image_channels:
            raise ValueError(f"{what} has {c} channels; the VAE encodes RGB videos [B, 3, T, H, W]")
        if (t - 1) % TEMPORAL_FACTOR:
            raise ValueError(f"{what} has T={t} frames; the VAE needs T = 4n + 1 (1, 5, 9, ..., 121)")
        if h % SPATIAL_FACTOR or w % SPATIAL_FACTOR or h == 0 or w == 0:
            raise ValueError(f"{what} is {h} x {w}; height and width must be positive multiples of "
                             f"{SPATIAL_FACTOR} pixels (crop or resize; padding would change the result)")

    @torch.no_grad()
    def encode(self, video: torch.Tensor, group: dist.ProcessGroup | None = None, *, grid=None,
               band_input: bool = False, gather_output: bool = False,
               stats: CommStats | None = None) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> normalised latents [B, 48, (T-1)/4+1, H/16, W/16].

        group: ranks sharing this call (None: unsharded). grid: (rows, cols) of tiles, default (N, 1).
        band_input: each rank passes only its tile (multiples of 16 px); otherwise every rank passes the
        full video and keeps its tile. gather_output: return the full latent on every rank instead of
        this rank's tile (``plan_partition`` tells which tile that is).
        """
        self._check_video(video, band_input)
        part = plan_partition(video.shape, group, factor=SPATIAL_FACTOR, grid=grid, band_input=band_input,
                              stats=stats, device=video.device)
        if not band_input:
            video = part.take_tile(video, SPATIAL_FACTOR)
        mu = self.encode_moments(video, part)[:, : self.config.z_dim]  # the log-variance half is unused here
        mean, std = self._latent_stats(mu)
        mu = (mu - mean) * std.reciprocal()
        return part.gather_tiles(mu, 1) if gather_output else mu

    # ---- decode ------------------------------------------------------------------------------------
    def _check_latents(self, latents: torch.Tensor) -> None:
        if not torch.is_tensor(latents) or latents.dim() != 5:
            raise ValueError(f"latents must be a [B, {self.config.z_dim}, T, h, w] tensor, "
                             f"got {getattr(latents, 'shape', type(latents))}")
        if latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents have {latents.shape[1]} channels, the VAE expects {self.config.z_dim}")
        if min(latents.shape[2:]) < 1:
            raise ValueError(f"latents have an empty dimension: {tuple(latents.shape)}")

    @torch.no_grad()
    def iter_decode(self, latents: torch.Tensor, group: dist.ProcessGroup | None = None, *, grid=None,
                    band_input: bool = False, frames_per_step: int = 1, stats: CommStats | None = None):
        """Yield this rank's tile of the video in frame groups: 1 frame for latent frame 0, then
        4 * frames_per_step frames per step. Frame groups can be written out as they come, so the whole
        video never has to be held; a larger ``frames_per_step`` trades memory for speed (same result)."""
        self._check_latents(latents)
        if frames_per_step < 1:
            raise ValueError(f"frames_per_step must be >= 1, got {frames_per_step}")
        part = plan_partition(latents.shape, group, factor=1, grid=grid, band_input=band_input,
                              stats=stats, device=latents.device)
        if not band_input:
            latents = part.take_tile(latents, 1)
        param = self.post_quant_conv.weight  # decode-only models may leave the encoder unallocated
        z = latents.to(device=param.device, dtype=param.dtype)
        mean, std = self._latent_stats(z)
        for frames in self.decode_raw(z * std + mean, part, frames_per_step):
            yield frames.clamp_(-1.0, 1.0)

    def decode(self, latents: torch.Tensor, group: dist.ProcessGroup | None = None, *, grid=None,
               band_input: bool = False, gather_output: bool = False, frames_per_step: int = 1,
               stats: CommStats | None = None) -> torch.Tensor:
        """Normalised latents [B, 48, T, h, w] -> video [B, 3, 4(T-1)+1, 16h, 16w] in [-1, 1] (this rank's
        tile unless gather_output). Arguments as in ``encode``; latent tiles may be any whole rows/cols."""
        b, _, t, h, w = latents.shape if torch.is_tensor(latents) and latents.dim() == 5 else (0,) * 5
        video = None
        start = 0
        for frames in self.iter_decode(latents, group, grid=grid, band_input=band_input,
                                       frames_per_step=frames_per_step, stats=stats):
            if video is None:  # preallocate: concatenating frame groups would hold the video twice
                video = frames.new_empty(b, frames.shape[1], TEMPORAL_FACTOR * (t - 1) + 1, *frames.shape[3:])
            video[:, :, start:start + frames.shape[2]] = frames
            start += frames.shape[2]
        if gather_output:
            part = plan_partition(latents.shape, group, factor=1, grid=grid, band_input=band_input,
                                  stats=stats, device=latents.device)
            video = part.gather_tiles(video, SPATIAL_FACTOR)
        return video

    # ---- checkpoints -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device="cpu",
                        config: WanVAE38Config | None = None, weights_only: bool = True) -> WanVAE38:
        """Load ``Wan2.2_VAE.pth`` (official keys) or a diffusers ``AutoencoderKLWan`` folder.

        ``path`` may be the .pth / .safetensors file, a diffusers VAE folder (config.json +
        diffusion_pytorch_model.safetensors) or a model repo root holding either. Without ``config`` the
        widths are read from config.json or inferred from the tensors.
        """
        weights, diffusers_config = locate_checkpoint(Path(path))
        state = read_state_dict(weights, weights_only=weights_only)
        layout = detect_layout(state)
        if config is None:
            config = config_from_diffusers(diffusers_config) if diffusers_config else _infer_config(state, layout)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        internal = to_internal(state, expected, layout, config.num_res_blocks)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in internal.items()}, assign=True)
        return model.eval().requires_grad_(False)

    def save_pretrained(self, path: str | Path, layout: str = "diffusers") -> Path:
        """Save as a diffusers folder (``layout="diffusers"``) or an official ``.pth`` file."""
        state = to_external({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                            layout, self.config.num_res_blocks)
        if layout == "official":
            return write_official(Path(path), state)
        return write_diffusers(Path(path), state, config_to_diffusers(self.config))


def _infer_config(state: dict, layout: str) -> WanVAE38Config:
    """Widths from tensor shapes; the rest of the structure is fixed for VAE38."""
    if layout == "official":
        base, dec, z = "encoder.conv1.weight", "decoder.head.2.weight", "conv2.weight"
    else:
        base, dec, z = "encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight"
    for key in (base, dec, z):
        if key not in state:
            raise KeyError(f"checkpoint ({layout} layout) lacks {key!r}, needed to infer the VAE widths")
    z_dim = state[z].shape[0]
    defaults = WanVAE38Config()
    if z_dim != defaults.z_dim:
        raise ValueError(f"checkpoint has z_dim={z_dim}; pass a WanVAE38Config with matching latents_mean/std")
    return WanVAE38Config(base_dim=state[base].shape[0], decoder_base_dim=state[dec].shape[1], z_dim=z_dim)


def config_from_diffusers(cfg: dict) -> WanVAE38Config:
    """WanVAE38Config from an AutoencoderKLWan config.json, refusing non-VAE38 variants."""
    wanted = {"is_residual": True, "patch_size": PATCH, "in_channels": 12, "out_channels": 12}
    for key, value in wanted.items():
        if cfg.get(key) != value:
            raise ValueError(f"AutoencoderKLWan config has {key}={cfg.get(key)!r}; VAE38 needs {value!r}")
    if cfg.get("attn_scales"):
        raise ValueError("AutoencoderKLWan config with attn_scales is not VAE38")
    known = {f.name for f in fields(WanVAE38Config)}
    values = {
        "base_dim": cfg["base_dim"],
        "decoder_base_dim": cfg.get("decoder_base_dim") or cfg["base_dim"],
        "z_dim": cfg["z_dim"],
        "dim_mult": tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
        "num_res_blocks": cfg.get("num_res_blocks", 2),
        "temporal_downsample": tuple(cfg.get("temperal_downsample", (False, True, True))),
        "latents_mean": tuple(cfg.get("latents_mean", LATENTS_MEAN)),
        "latents_std": tuple(cfg.get("latents_std", LATENTS_STD)),
    }
    return WanVAE38Config(**{k: v for k, v in values.items() if k in known})


def config_to_diffusers(config: WanVAE38Config) -> dict:
    c = asdict(config)
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": c["base_dim"], "decoder_base_dim": c["decoder_base_dim"], "z_dim": c["z_dim"],
        "dim_mult": list(c["dim_mult"]), "num_res_blocks": c["num_res_blocks"], "attn_scales": [],
        "temperal_downsample": list(c["temporal_downsample"]), "dropout": 0.0,
        "latents_mean": list(c["latents_mean"]), "latents_std": list(c["latents_std"]),
        "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": PATCH,
        "scale_factor_temporal": TEMPORAL_FACTOR, "scale_factor_spatial": SPATIAL_FACTOR,
    }


__all__ = ["WanVAE38", "WanVAE38Config", "LATENTS_MEAN", "LATENTS_STD", "plan_partition", "patchify",
           "unpatchify", "config_from_diffusers", "config_to_diffusers"]
