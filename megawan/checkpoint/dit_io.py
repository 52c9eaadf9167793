"""Load / save WanDiT weights from / to released checkpoint directories, TP slice by TP slice.

A megawan parameter maps to one release tensor, or (fused q/k/v) to several concatenated along
dim 0. A TP-split parameter holds, on rank r, the r-th slice of each of its release tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megawan.checkpoint.dit_keys import NEW_IN_MEGAWAN, detect_layout, official_keys, to_layout
from megawan.checkpoint.safetensors_dir import CheckpointError, SafetensorsDir, write_safetensors_dir


def _tp_split_dim(p: torch.nn.Parameter) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def _preview(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _part_shape(p: torch.nn.Parameter, parts: int, tp: int) -> tuple[int, ...]:
    """Full shape of each release tensor behind parameter ``p`` (``parts`` of them)."""
    shape = list(p.shape)
    shape[0] //= parts
    dim = _tp_split_dim(p)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


@torch.no_grad()
def load_dit_weights(model, path) -> str:
    """Copy a checkpoint (official or diffusers keys, any float dtype) into ``model``; return the layout.

    Each rank reads only its own TP slice of every split tensor. Missing or unexpected keys and
    shape mismatches raise CheckpointError naming the key and file.
    """
    ckpt = SafetensorsDir(path)
    layout = detect_layout(ckpt.keys())
    g = model.groups
    wanted = {n: [to_layout(k, layout) for k in official_keys(n)] for n, _ in model.named_parameters()}
    expected = {k for keys in wanted.values() for k in keys}
    missing, unexpected = expected - set(ckpt.keys()), set(ckpt.keys()) - expected
    new = {to_layout(k, layout) for n in wanted if n.startswith(NEW_IN_MEGAWAN) for k in official_keys(n)}
    if new and new <= missing:  # a released checkpoint: the state embedder keeps its zero initialisation
        logging.getLogger("megawan").info("checkpoint %s has no state embedding: starting it at zero", path)
        missing -= new
        wanted = {n: keys for n, keys in wanted.items() if not n.startswith(NEW_IN_MEGAWAN)}
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} ({layout} layout) does not match WanDiT({model.config}): "
                              f"missing keys [{_preview(missing)}]; unexpected keys [{_preview(unexpected)}]")
    for name, p in model.named_parameters():
        if name not in wanted:
            continue
        keys, dim = wanted[name], _tp_split_dim(p)
        want = _part_shape(p, len(keys), g.tp)
        for key in keys:
            if ckpt.shape(key) != want:
                raise CheckpointError(f"{key!r} in {ckpt.path / ckpt.weight_map[key]} has shape "
                                      f"{ckpt.shape(key)}, the model expects {want}")
        p.copy_(torch.cat([ckpt.read(key, dim, g.tp_rank, g.tp) for key in keys]).to(p.dtype))
    return layout


def iter_full_state(model):
    """Yield (official key, full tensor) for every release tensor, gathering TP slices (collective over TP)."""
    g = model.groups
    for name, p in model.named_parameters():
        keys, dim = official_keys(name), _tp_split_dim(p)
        for key, t in zip(keys, p.detach().chunk(len(keys), dim=0)):
            if dim is not None and g.tp > 1:
                slices = [torch.empty_like(t) for _ in range(g.tp)]
                dist.all_gather(slices, t.contiguous(), group=g.tp_group)
                t = torch.cat(slices, dim=dim)
            yield key, t


def save_dit_weights(model, path, layout: str = "official", max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the whole model in ``layout`` from global rank 0 (every rank must call this)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):  # checked on every rank, before any collective
        raise FileExistsError(f"refusing to overwrite non-empty directory {path}")
    cfg = model.config
    config = cfg.to_official() if layout == "official" else cfg.to_diffusers()
    tensors = ((to_layout(k, layout), t) for k, t in iter_full_state(model))
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_safetensors_dir(tensors, path, extra_files={"config.json": config}, max_shard_bytes=max_shard_bytes)
    else:
        for _ in tensors:  # take part in the TP gathers
            pass
    if dist.is_initialized():
        dist.barrier()
