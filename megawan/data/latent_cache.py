"""Latent cache: VAE latents and umT5 text embeddings computed once, read by the trainer instead of video.

    cache/index.json                      shard list, sample counts, text mode, latent shape
    cache/cache_config.json               what produced the cache (a rerun must match it)
    cache/shards/shard_{k:05d}.safetensors
        latents [n, 48, F, h, w]; states [n, T, 25], shard / first_frame / segment_id [n] (1X);
        index [n] (captioned folders); text_embeds [sum L_i, D] + text_lengths [n] (per-sample text)
    cache/empty_prompt.safetensors        text_embeds [L, D]: the one embedding of the world model's
                                          empty prompt, shared by every sample

Shards are written to a temporary name and renamed, so a file under its final name is complete and a
rerun skips it. Text embeddings are stored without their zero padding and padded to 512 on load.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from pathlib import Path

import torch
import torch.utils.data
from safetensors import safe_open

from megawan.utils import atomic_path, save_safetensors
from megawan.data.text_encoder import TEXT_LENGTH, pad_text_embedding

INDEX = "index.json"
CONFIG = "cache_config.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
FORMAT = "megawan-latent-cache"


def shard_name(k: int) -> str:
    return f"shards/shard_{k:05d}.safetensors"


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write ``path`` whole or not at all, with the umask's file mode (a cache is shared, like a checkpoint)."""
    with atomic_path(path) as tmp:
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def check_or_write_config(root: Path, config: dict) -> None:
    """Record what produces this cache; refuse to resume a cache made with other settings."""
    path = root / CONFIG
    if path.exists():
        existing = json.loads(path.read_text())
        if existing != config:
            changed = sorted(k for k in set(existing) | set(config) if existing.get(k) != config.get(k))
            raise ValueError(f"{root} was made with other settings ({', '.join(changed)}); "
                             "use a new output folder or delete it")
        return
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(config, indent=1, sort_keys=True) + "\n")


def write_index(root: Path, num_shards: int, text_mode: str) -> dict:
    """List every finished shard in ``index.json``; missing shards make it an error to read the cache."""
    shards = []
    latent_shape = None
    for k in range(num_shards):
        path = root / shard_name(k)
        if not path.exists():
            raise FileNotFoundError(f"cache shard {path} is missing: rerun precompute to finish it")
        with safe_open(str(path), "pt") as f:
            shape = f.get_slice("latents").get_shape()
        latent_shape = shape[1:]
        shards.append({"file": shard_name(k), "num_samples": shape[0]})
    index = {"format": FORMAT, "version": 1, "num_samples": sum(s["num_samples"] for s in shards),
             "latent_shape": latent_shape, "text": text_mode, "text_length": TEXT_LENGTH, "shards": shards}
    _atomic_write_text(root / INDEX, json.dumps(index, indent=1) + "\n")
    return index


class LatentCacheDataset(torch.utils.data.Dataset):
    """Item i: latents [48, F, h, w], text_embeds [512, D] (zero-padded), text_length, and whatever the
    source stored per sample (states [T, 25] and ids for 1X; caption and index for folders)."""

    def __init__(self, root):
        self.root = Path(root)
        self.meta = json.loads((self.root / INDEX).read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.root / INDEX} is not a megawan latent cache index")
        self._ends, total = [], 0
        for shard in self.meta["shards"]:
            total += shard["num_samples"]
            self._ends.append(total)
        self._shared_text = None
        if self.meta["text"] == "shared":
            with safe_open(str(self.root / EMPTY_PROMPT), "pt") as f:
                embedding = f.get_tensor("text_embeds")
            self._shared_length = embedding.shape[0]
            self._shared_text = pad_text_embedding(embedding, self.meta["text_length"])
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = {}
        return state

    def _shard(self, k: int):
        if k not in self._open:
            handle = safe_open(str(self.root / self.meta["shards"][k]["file"]), "pt")
            captions = json.loads((handle.metadata() or {}).get("captions", "null"))
            offsets = None
            if "text_lengths" in handle.keys():
                lengths = handle.get_tensor("text_lengths")
                offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).tolist()
            self._open = {k: (handle, captions, offsets)}  # one open shard per worker: reads are local
        return self._open[k]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect_right(self._ends, i)
        j = i - (self._ends[k - 1] if k else 0)
        handle, captions, offsets = self._shard(k)
        sample = {"latents": handle.get_slice("latents")[j]}
        for key in handle.keys():
            if key in ("latents", "text_embeds", "text_lengths"):
                continue
            value = handle.get_slice(key)[j]
            sample[key] = value.item() if value.dim() == 0 else value
        if self._shared_text is not None:
            sample["text_embeds"], sample["text_length"] = self._shared_text, self._shared_length
        else:
            embedding = handle.get_slice("text_embeds")[offsets[j]:offsets[j + 1]]
            sample["text_embeds"] = pad_text_embedding(embedding, self.meta["text_length"])
            sample["text_length"] = offsets[j + 1] - offsets[j]
        if captions is not None:
            sample["caption"] = captions[j]
        return sample
