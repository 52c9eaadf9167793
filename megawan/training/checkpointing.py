"""Distributed training checkpoints: megatron-core ``dist_checkpointing``, resumable into another layout.

A checkpoint is a folder ``step_{N:08d}`` under ``<out_dir>/checkpoints`` holding:
- the model's parameters as ShardedTensors in *global* coordinates (a TP-split parameter is one global
  tensor cut along its partition dim; the fused q/k/v parameter is saved as three tensors q, k, v, each cut
  along dim 0, so any TP size can read it back);
- the distributed optimizer's fp32 master weights and Adam moments in the same global (model) space,
  megatron's ``fully_reshardable`` format: they follow the parameters into any TP / CP / DP layout;
- the EMA of the fp32 master weights when enabled (same keys under ``ema.``; each rank holds only its
  optimizer slice of it in memory, gathered into these global tensors for the write);
- common state written once: step, LR schedule, data position (a global sample count), counters, config;
- each rank's RNG states (restored when the layout is unchanged; every random draw of training is
  derived from (seed, step, data-parallel rank) anyway, so a resharded resume draws the same noise).

Writes are atomic: every rank writes into ``.tmp-step_N``; after a barrier rank 0 adds
``megawan_checkpoint.json`` (the completion marker) and renames the folder. A crash or a killed rank
mid-write leaves only a ``.tmp-`` folder, reported and skipped (then removed) by the next run, and the
last good checkpoint is untouched. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

logger = logging.getLogger("megawan.train")

MARKER = "megawan_checkpoint.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def _strided_factory(key: str, param: torch.nn.Parameter, tp_rank: int, tp: int, replica_id):
    """A parameter holding ``stride`` TP-split release tensors stacked on dim 0 (q/k/v) -> one global
    tensor per part, each cut along dim 0 over TP."""
    stride = param.partition_stride

    def build(key, data, replica_id, flattened_range):
        assert flattened_range is None, "fully_reshardable optimizer state is never flattened"
        return [ShardedTensor.from_rank_offsets(f"{key}.part{i}", part, (0, tp_rank, tp), replica_id=replica_id)
                for i, part in enumerate(torch.chunk(data, stride, dim=0))]

    def merge(parts):
        return torch.cat(parts, dim=0)

    return ShardedTensorFactory(key, param, build, merge, replica_id)


def tensors_sharded_state_dict(named_tensors, prefix: str, groups) -> dict:
    """ShardedTensors (global coordinates) for (name, tensor) pairs carrying megatron's TP attributes."""
    out = {}
    for name, t in named_tensors:
        key = f"{prefix}{name}"
        if getattr(t, "tensor_model_parallel", False):
            if getattr(t, "partition_stride", 1) > 1:
                out[name] = _strided_factory(key, t, groups.tp_rank, groups.tp, (0, 0, _dp_cp_rank(groups)))
            else:
                out[name] = make_tp_sharded_tensor_for_checkpoint(t, key, tp_axis=t.partition_dim)
        else:
            out[name] = make_sharded_tensor_for_checkpoint(t, key)
    return out


def _dp_cp_rank(groups) -> int:
    return dist.get_rank(groups.dp_cp_group)


def model_sharded_state_dict(model, groups) -> dict:
    """The model's parameters themselves (not copies: the optimizer maps its state to them by identity)."""
    return tensors_sharded_state_dict(model.named_parameters(), "model.", groups)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def build_sharded_state_dict(model, optimizer, groups, *, ema=None, common: dict) -> dict:
    _init_adam_state(optimizer)  # a checkpoint before the first step (e.g. a signal during start-up)
    model_sd = model_sharded_state_dict(model, groups)
    sd = {"model": model_sd,
          "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata={
              "distrib_optim_sharding_type": "fully_reshardable"}),
          "common": common}
    if ema is not None:
        sd["ema"] = ema_sharded_state_dict(ema.full_tensors(), model, groups)
    world, rank = dist.get_world_size(), dist.get_rank()
    sd["rng"] = ShardedObject(f"rng_world{world}", _rng_state(), (world,), (rank,), replica_id=0)
    return sd


def ema_sharded_state_dict(full: dict, model, groups) -> dict:
    """ShardedTensors ``ema.<param>`` for full (model-space, this rank's TP slice) EMA tensors: the same
    global layout as ``model.<param>``, so the EMA reshards into any layout as the weights do. The
    tensors get the parameters' TP attributes; they stay on the CPU (as megatron's gathered optimizer
    state does)."""
    params = dict(model.named_parameters())
    for name, t in full.items():
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(params[name], attr):
                setattr(t, attr, getattr(params[name], attr))
    return tensors_sharded_state_dict(full.items(), "ema.", groups)


def has_ema(path) -> bool:
    """Whether the checkpoint at ``path`` holds an EMA (it was trained with optim.ema_decay > 0)."""
    return any(k.startswith("ema.") for k in dist_checkpointing.load_tensors_metadata(str(path)))


def save_checkpoint(root, step: int, model, optimizer, groups, *, ema=None, common: dict, keep: int) -> Path:
    """Collective: write step ``step`` atomically, then drop all but the newest ``keep`` checkpoints."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = build_sharded_state_dict(model, optimizer, groups, ema=ema, common=common)
    dist_checkpointing.save(sd, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        marker = {"step": step, "layout": {"tp": groups.tp, "cp": groups.cp, "dp": groups.dp},
                  "world_size": dist.get_world_size()}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(root) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_resume_point(root) -> Path | None:
    """The newest complete checkpoint; torn ones (a write that never finished) are reported."""
    root = Path(root)
    if not root.is_dir():
        return None
    for torn in sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)
                       or (p.name.startswith(PREFIX) and not (p / MARKER).exists())):
        logger.warning("checkpoint %s is incomplete (its write was interrupted): skipped", torn)
    done = complete_checkpoints(root)
    return done[-1] if done else None


def remove_torn(root) -> None:
    """Rank 0, after a successful resume or before the first save: delete interrupted writes."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) or (p.name.startswith(PREFIX) and not (p / MARKER).exists()):
                shutil.rmtree(p, ignore_errors=True)


def _init_adam_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state: before a load into a fresh optimizer, or a save before
    the first step.

    megatron-core 0.16.1's DistributedOptimizer.state_dict() reads each parameter's Adam ``step`` when
    neither Apex nor Transformer Engine provides the fused Adam, and so fails on an optimizer that has not
    stepped yet. torch's Adam would create exactly this state lazily on its first step.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(step=torch.zeros((), dtype=torch.float32),
                                          exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def read_common(path) -> dict:
    """The common state of a checkpoint (step, schedule, data position, config), without loading tensors."""
    return dist_checkpointing.load_common_state_dict(str(path))["common"]


def load_checkpoint(path, model, optimizer, groups, *, ema=None) -> dict:
    """Collective: load ``path`` into the model, optimizer (and EMA) of this layout; return the common state."""
    path = Path(path)
    _init_adam_state(optimizer)
    marker = json.loads((path / MARKER).read_text())
    sd = {"model": model_sharded_state_dict(model, groups), "common": None}
    sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=True, metadata={
        "distrib_optim_sharding_type": "fully_reshardable"})
    load_ema = ema is not None and has_ema(path)
    if load_ema:  # empty CPU tensors of the full shapes, filled by the load, then cut into this rank's slices
        sd["ema"] = ema_sharded_state_dict({n: torch.empty(p.shape, dtype=torch.float32)
                                            for n, p in model.named_parameters()}, model, groups)
    world, rank = dist.get_world_size(), dist.get_rank()
    same_layout = marker["world_size"] == world
    if same_layout:
        sd["rng"] = ShardedObject(f"rng_world{world}", None, (world,), (rank,), replica_id=0)
    sd.pop("common")
    loaded = dist_checkpointing.load(sd, str(path))
    common = dist_checkpointing.load_common_state_dict(str(path))["common"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(loaded["model"][name])
    optimizer.load_state_dict(loaded["optimizer"])
    if load_ema:
        ema.load_full(loaded["ema"])
    elif ema is not None:  # the checkpoint has none (EMA switched on for this run): start at the master weights
        ema.reset_to_master()
    if same_layout and "rng" in loaded:
        torch.set_rng_state(loaded["rng"]["cpu"])
        if torch.cuda.is_available() and "cuda" in loaded["rng"]:
            torch.cuda.set_rng_state(loaded["rng"]["cuda"])
    logger.info("resumed from %s (saved at tp=%d cp=%d dp=%d; now tp=%d cp=%d dp=%d)", path,
                marker["layout"]["tp"], marker["layout"]["cp"], marker["layout"]["dp"],
                groups.tp, groups.cp, groups.dp)
    return common
