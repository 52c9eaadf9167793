"""Training batches: 1X clips encoded on the fly by the sharded VAE38, or latents from the latent cache.

Every rank of one model replica (its TP x CP ranks) reads the same clips: the sampler is keyed by the
data-parallel rank alone. On the fly, the replica's ranks share each VAE encode (each encodes one band of
rows, ``groups.vae_group``). Text comes precomputed (umT5 runs offline): the cache's per-sample
embeddings, or the world model's one empty-prompt embedding (``data.empty_prompt``); without one the
text is all padding (zeros), as for a model trained without prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from megawan.data.bad_input import BadInputReport
from megawan.data.latent_cache import EMPTY_PROMPT, LatentCacheDataset
from megawan.data.loader import ClipLoader
from megawan.data.sampler import DistributedClipSampler
from megawan.data.text_encoder import pad_text_embedding
from megawan.data.world_model_1x import WorldModel1XConfig, WorldModel1XDataset
from megawan.vae import WanVAE38
from megawan.vae.pretrained import load_vae

logger = logging.getLogger("megawan.train")

SOURCE_SIZE_1X = (512, 512)


@dataclass
class Batch:
    """One micro-batch on the compute device: latents [B, 48, F, h, w] fp32, text [B, 512, D], states or None."""

    latents: torch.Tensor
    text: torch.Tensor
    states: torch.Tensor | None

    @property
    def size(self) -> int:
        return self.latents.shape[0]


def latent_shape(data_cfg) -> tuple[int, int, int]:
    """(F, h, w) of the latents one sample of this config gives (before any data is read)."""
    if data_cfg.source == "cache":
        import json

        meta = json.loads((Path(data_cfg.root) / "index.json").read_text())
        return tuple(meta["latent_shape"][1:])
    h, w = data_cfg.size or SOURCE_SIZE_1X
    return (data_cfg.clip_frames - 1) // 4 + 1, h // 16, w // 16


def _load_empty_prompt(path: str | None, text_dim: int, text_len: int) -> torch.Tensor:
    if path is None:
        return torch.zeros(text_len, text_dim)
    with safe_open(str(path), "pt") as f:
        emb = f.get_tensor("text_embeds").float()
    if emb.ndim != 2 or emb.shape[1] != text_dim:
        raise ValueError(f"{path}: text_embeds must be [L, {text_dim}] for this model, got {tuple(emb.shape)}")
    return pad_text_embedding(emb, text_len)


def build_vae(data_cfg, device) -> WanVAE38:
    """``data.vae``: a preset (random weights, seed 0), a fitted VAE of the package (``tiny_sample``) or a path."""
    return load_vae(data_cfg.vae, device)


def build_dataset(data_cfg, root: str | None = None, report: BadInputReport | None = None):
    """The dataset of ``data_cfg`` (or of ``root``); a 1X one sends its bad input to ``report`` if given."""
    root = root or data_cfg.root
    if data_cfg.source == "cache":
        return LatentCacheDataset(root)
    return WorldModel1XDataset(WorldModel1XConfig(
        root=root, clip_frames=data_cfg.clip_frames, frame_stride=data_cfg.frame_stride,
        window_hop=data_cfg.window_hop, size=tuple(data_cfg.size) if data_cfg.size else None,
        backend=data_cfg.backend, bad_input=data_cfg.bad_input), report)


class MemoisedClips(torch.utils.data.Dataset):
    """A 1X dataset whose items, once their latents are in ``memo`` (item -> (latents, states)), are not decoded
    again: such an item comes back with a zero video of the clip's shape (stacked like any other, never encoded)
    and ``"item"``, which ``TrainingData.to_batch`` uses to take its latents from the memo. The memo is filled in
    the training process, so it saves work only when items are read there (``data.num_workers`` 0)."""

    def __init__(self, dataset, memo: dict):
        self.dataset, self.memo = dataset, memo
        self.report = getattr(dataset, "report", None)
        self._blank = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        hit = self.memo.get(i)
        if hit is None or self._blank is None:
            item = self.dataset[i]
            if self._blank is None:
                self._blank = torch.zeros_like(item["video"])
            return {"video": item["video"], "states": item["states"], "item": i,
                    **({"skipped": item["skipped"]} if "skipped" in item else {})}
        return {"video": self._blank, "states": hit[1], "item": i}


class TrainingData:
    """The loader of this rank's clips and their conversion into ``Batch`` es (the VAE call is collective).

    ``data.memo_latents`` keeps each 1X window's latents in memory after its first encode (27 KiB a window
    at 33 frames of 64 x 64): a small split such as the sample data (464 windows) is then decoded and encoded
    once per window instead of once per visit, which is most of a tiny model's step time on CPU. The latents
    are the same either way (the encode is deterministic); the memo is not saved with checkpoints.
    """

    def __init__(self, data_cfg, groups, *, text_dim: int, text_len: int, seed: int, with_states: bool):
        self.cfg, self.groups, self.with_states = data_cfg, groups, with_states
        # the run's bad input (every dataset the trainer opens reports here): nothing is printed per process,
        # the trainer tells it once for the job (megawan.training.bad_input_log)
        self.report = BadInputReport(data_cfg.bad_input, announce=False)
        self.dataset = build_dataset(data_cfg, report=self.report)
        self.memo: dict | None = {} if data_cfg.memo_latents and data_cfg.source == "1x" else None
        self.sampler = DistributedClipSampler(len(self.dataset), dp_rank=groups.dp_rank, dp_size=groups.dp,
                                              seed=seed)
        source = self.dataset if self.memo is None else MemoisedClips(self.dataset, self.memo)
        self.loader = ClipLoader(source, self.sampler, batch_size=data_cfg.batch_size,
                                 num_workers=data_cfg.num_workers,
                                 decode_device=groups.device if groups.device.type == "cuda" else None)
        self.vae = build_vae(data_cfg, groups.device) if data_cfg.source == "1x" else None
        empty = data_cfg.empty_prompt
        if empty is None and data_cfg.source == "cache" and (Path(data_cfg.root) / EMPTY_PROMPT).exists():
            empty = str(Path(data_cfg.root) / EMPTY_PROMPT)
        if empty is None:
            logger.info("no empty-prompt embedding given (data.empty_prompt): empty text is all padding")
        self.empty_text = _load_empty_prompt(empty, text_dim, text_len)
        self._iter = None

    def batches(self):
        """Endless micro-batches, epoch after epoch (the loader's position is in ``state_dict``)."""
        while True:
            for raw in self.loader:
                yield self.to_batch(raw)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            video = video.to(self.groups.device, self.vae_dtype)
            return self.vae.encode(video, self.groups.vae_group if self.groups.tp * self.groups.cp > 1 else None,
                                   gather_output=True).float()

    def _memo_latents(self, raw: dict) -> torch.Tensor:
        """Latents of a batch of ``MemoisedClips`` items: the memo's, and an encode of the others (the replica's
        ranks hold the same items, so they agree on what to encode)."""
        items = raw["item"].tolist()
        missing = [k for k, item in enumerate(items) if item not in self.memo]
        if missing:
            encoded = self._encode(raw["video"][missing])
            for k, latents in zip(missing, encoded):
                self.memo[items[k]] = (latents.cpu(), raw["states"][k].clone())
        return torch.stack([self.memo[item][0] for item in items]).to(self.groups.device)

    def to_batch(self, raw: dict) -> Batch:
        dev = self.groups.device
        if self.vae is not None and self.memo is not None and "item" in raw:
            latents = self._memo_latents(raw)
        elif self.vae is not None:
            latents = self._encode(raw["video"])
        else:
            latents = raw["latents"].to(dev).float()
        n = latents.shape[0]
        if "text_embeds" in raw:
            text = raw["text_embeds"].to(dev).float()
        else:
            text = self.empty_text.to(dev)[None].expand(n, -1, -1).contiguous()
        states = raw["states"].to(dev).float() if self.with_states and "states" in raw else None
        if self.with_states and states is None:
            raise ValueError("model.state_dim > 0 but the data has no robot states (use the 1X source or a 1X cache)")
        return Batch(latents, text, states)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def skip_counts(self) -> dict:
        return dict(self.loader.skip_counts)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def validation_clips(num_items: int, num_clips: int) -> list[int]:
    """Fixed held-out items, spread over the split: the same every run and every layout."""
    return sorted(set(np.linspace(0, num_items - 1, num=min(num_clips, num_items)).round().astype(int).tolist()))
