"""Load / save WanDiT weights from / to released checkpoint directories, TP slice by TP slice."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megawan.checkpoint.dit_keys import detect_layout, megawan_to_official, to_layout
from megawan.checkpoint.safetensors_dir import CheckpointError, SafetensorsDir, write_safetensors_dir


def _tp_split_dim(p: torch.nn.Parameter) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def _preview(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


@torch.no_grad()
def load_dit_weights(model, path) -> str:
    """Copy a checkpoint (official or diffusers keys, any float dtype) into ``model``; return the layout.

    Each rank reads only its own TP slice of every split tensor. Missing or unexpected keys and
    shape mismatches raise CheckpointError naming the key and file.
    """
    ckpt = SafetensorsDir(path)
    layout = detect_layout(ckpt.keys())
    g = model.groups
    expected = {to_layout(megawan_to_official(n), layout): p for n, p in model.named_parameters()}
    missing, unexpected = set(expected) - set(ckpt.keys()), set(ckpt.keys()) - set(expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} ({layout} layout) does not match WanDiT({model.config}): "
                              f"missing keys [{_preview(missing)}]; unexpected keys [{_preview(unexpected)}]")
    for key, p in expected.items():
        dim = _tp_split_dim(p)
        want = list(p.shape)
        if dim is not None:
            want[dim] *= g.tp
        got = ckpt.shape(key)
        if tuple(want) != got:
            raise CheckpointError(f"{key!r} in {ckpt.path / ckpt.weight_map[key]} has shape {got}, "
                                  f"the model expects {tuple(want)}")
        p.copy_(ckpt.read(key, dim, g.tp_rank, g.tp).to(p.dtype))
    return layout


def iter_full_state(model):
    """Yield (official key, full tensor) for every parameter, gathering TP slices (collective over TP)."""
    g = model.groups
    for name, p in model.named_parameters():
        t = p.detach()
        dim = _tp_split_dim(p)
        if dim is not None and g.tp > 1:
            parts = [torch.empty_like(t) for _ in range(g.tp)]
            dist.all_gather(parts, t.contiguous(), group=g.tp_group)
            t = torch.cat(parts, dim=dim)
        yield megawan_to_official(name), t


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
