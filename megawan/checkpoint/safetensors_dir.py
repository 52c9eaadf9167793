"""A directory of safetensors shards (+ optional ``*.safetensors.index.json``), read lazily.

Reading returns single tensors or slices of them without loading whole shards, so each rank can
read only its own tensor-parallel slice. Writing goes to a temporary directory renamed into place
at the end, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from megawan.utils import atomic_path, save_safetensors


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: missing shard, corrupt file, bad key or shape."""


class SafetensorsDir:
    def __init__(self, path, prefix: str = "diffusion_pytorch_model"):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        index = sorted(self.path.glob(f"{prefix}*.safetensors.index.json")) or sorted(
            self.path.glob("*.safetensors.index.json"))
        if index:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files or index in {self.path}")
            weight_map = {k: f.name for f in files for k in self._open(f.name).keys()}
        missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"checkpoint {self.path} is missing shard(s) {missing} listed in its index")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def _open(self, fname: str):
        handles = self.__dict__.setdefault("_handles", {})
        if fname not in handles:
            try:
                handles[fname] = safe_open(str(self.path / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error type for bad headers/sizes
                raise CheckpointError(f"cannot read checkpoint shard {self.path / fname}: {e} "
                                      f"(truncated or corrupt file?)") from e
        return handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _slice(self, key: str):
        if key not in self.weight_map:
            raise CheckpointError(f"key {key!r} is missing from checkpoint {self.path}")
        fname = self.weight_map[key]
        handle = self._open(fname)
        try:
            return handle.get_slice(key), fname
        except Exception as e:
            raise CheckpointError(f"key {key!r} listed for {self.path / fname} cannot be read there: {e}") from e

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key)[0].get_shape())

    def read(self, key: str, split_dim: int | None = None, rank: int = 0, parts: int = 1) -> torch.Tensor:
        """The whole tensor, or its ``rank``-th of ``parts`` equal slices along ``split_dim``."""
        sl, fname = self._slice(key)
        try:
            if split_dim is None or parts == 1:
                return sl[:]
            size = sl.get_shape()[split_dim] // parts
            index = [slice(None)] * len(sl.get_shape())
            index[split_dim] = slice(rank * size, (rank + 1) * size)
            return sl[tuple(index)]
        except Exception as e:
            raise CheckpointError(f"reading {key!r} from {self.path / fname} failed: {e} "
                                  f"(truncated or corrupt file?)") from e


def write_safetensors_dir(tensors: Iterable[tuple[str, torch.Tensor]], path, *, extra_files: dict | None = None,
                          prefix: str = "diffusion_pytorch_model", max_shard_bytes: int = 5 * 2**30) -> None:
    """Write (key, tensor) pairs as shards of at most ``max_shard_bytes`` plus an index, atomically.

    ``extra_files`` maps file names (e.g. config.json) to JSON-serialisable contents.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"refusing to overwrite non-empty directory {path}")
    with atomic_path(path) as tmp:
        tmp.mkdir()
        shard_keys: list[list[str]] = []  # keys of each shard flushed to disk
        current: dict[str, torch.Tensor] = {}
        size = 0

        def flush():
            save_safetensors(current, tmp / f"shard-{len(shard_keys)}.tmp", metadata={"format": "pt"})
            shard_keys.append(list(current))

        for key, t in tensors:  # memory holds at most one shard
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                current, size = {}, 0
            current[key] = t.detach().cpu().contiguous()
            size += nbytes
        flush()
        n = len(shard_keys)
        if n == 1:
            os.replace(tmp / "shard-0.tmp", tmp / f"{prefix}.safetensors")
        else:
            weight_map = {}
            for i, keys in enumerate(shard_keys):
                name = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / f"shard-{i}.tmp", tmp / name)
                weight_map.update({k: name for k in keys})
            (tmp / f"{prefix}.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
