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

Writes are atomic and durable: every rank writes into ``.tmp-step_N`` and fsyncs the files it wrote; after a
barrier (every rank's shards are on disk) rank 0 fsyncs the shared files, adds ``megawan_checkpoint.json``
(the completion marker), fsyncs it and renames the folder. A crash or a killed rank mid-write leaves only a
``.tmp-`` folder, reported and skipped (then removed) by the next run, and the last good checkpoint is
untouched. Saving a step that exists already never leaves a moment with no copy of it on disk: the old copy
is renamed to ``.replaced-step_N`` first and removed only after the new one is in place (a run that died in
between gets it back on its next start). The newest ``keep`` checkpoints are kept.

Resuming: rank 0 alone lists the folder and checks the newest complete checkpoint's files against its own
index (every shard file present and long enough); an unreadable one is set aside as ``.unreadable-step_N``
and the previous one is used, saying so. The choice is broadcast, so all ranks load the same step even when
their views of a shared file system differ.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint

from megawan.training.signals import stop_signals_kept_from_children

logger = logging.getLogger("megawan.train")

MARKER = "megawan_checkpoint.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"  # the previous copy of a step being saved again, until the new one is in place
UNREADABLE_PREFIX = ".unreadable-"  # a complete-looking checkpoint whose files do not match its index


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


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)  # one place, so a test can stop the process between two renames


def _fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_own_files(folder: Path, rank: int) -> None:
    """fsync what this rank wrote into ``folder``: torch DCP names its shard files ``__{rank}_{i}.distcp``;
    rank 0 also writes the index and common state (``.metadata``, ``common.pt``, ``metadata.json``).
    megatron fsyncs its shards itself; the other files it leaves in the page cache."""
    mine = f"__{rank}_"
    for p in sorted(folder.iterdir()):
        shard = p.name.startswith("__")
        if p.is_file() and (p.name.startswith(mine) if shard else rank == 0):
            _fsync_path(p)


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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written for lack of space; the message names it and the last good one."""

    def __str__(self) -> str:
        return self.strerror


_SHORT_WRITE = "unexpected pos"  # torch's zip writer on a short write (the disk filled mid-file): no errno


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _disk_full(error: BaseException, root: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC anywhere in the exception chain (or in the text of a
    writer process's error, which torch's CheckpointException carries only as text), or the short-write
    error of torch's zip writer while less space is left than the last complete checkpoint took (64 MiB
    when there is none)."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e)
           for e in chain):
        return True
    if any(_SHORT_WRITE in str(e) for e in chain):
        good = complete_checkpoints(root)
        need = sum(f.stat().st_size for f in good[-1].rglob("*") if f.is_file()) if good else 64 * 2**20
        return _free_bytes(root) < need
    return False


def save_checkpoint(root, step: int, model, optimizer, groups, *, ema=None, common: dict, keep: int) -> Path:
    """Collective: write step ``step`` atomically and durably, then drop all but the newest ``keep``."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    sd = build_sharded_state_dict(model, optimizer, groups, ema=ema, common=common)
    try:
        with stop_signals_kept_from_children():  # its writer processes must not die of a Ctrl-C to the group
            dist_checkpointing.save(sd, str(tmp))
        _fsync_own_files(tmp, rank)
    except Exception as e:
        if not _disk_full(e, root):
            raise
        if rank == 0:  # free what the partial write took; the newest complete checkpoint is untouched
            shutil.rmtree(tmp, ignore_errors=True)
        good = complete_checkpoints(root)
        raise CheckpointWriteError(
            errno.ENOSPC, f"no space left on device while writing {final}; the last good checkpoint is "
            f"{good[-1] if good else 'none (no checkpoint of this run is complete)'} (the partial write was removed; "
            f"{_free_bytes(root) / 2**30:.2f} GiB free on {_mount_point(root)})") from e
    dist.barrier()  # every rank's files are on disk: only now may the marker say the checkpoint is complete
    if rank == 0:
        _write_marker(tmp, {"step": step, "layout": {"tp": groups.tp, "cp": groups.cp, "dp": groups.dp},
                            "world_size": dist.get_world_size()})
        _put_in_place(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def _write_marker(folder: Path, marker: dict) -> None:
    """The completion marker, durable, with the folder's entries (called once every rank's files are)."""
    with open(folder / MARKER, "w") as f:
        f.write(json.dumps(marker, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(folder)


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` onto ``final``; an existing ``final`` (the same step saved again, e.g. after
    a resume from ``checkpoint.load``) stays on disk as ``.replaced-step_N`` until the new copy is in place."""
    root = final.parent
    aside = root / f"{REPLACED_PREFIX}{final.name}"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        _rename(final, aside)
        try:
            _rename(tmp, final)
        except BaseException:
            _rename(aside, final)
            raise
        _fsync_path(root)
        shutil.rmtree(aside)
    else:
        _rename(tmp, final)
    _fsync_path(root)


def recover_replaced(root) -> list[str]:
    """Rank 0 at start: a ``.replaced-step_N`` left by a run that died between its two renames goes back to
    ``step_N`` when no complete ``step_N`` exists, and is removed when one does. Returns what was done."""
    root = Path(root)
    notes = []
    if not root.is_dir():
        return notes
    for aside in sorted(p for p in root.iterdir() if p.name.startswith(REPLACED_PREFIX)):
        final = root / aside.name[len(REPLACED_PREFIX):]
        if (final / MARKER).exists():
            shutil.rmtree(aside, ignore_errors=True)
        elif (aside / MARKER).exists():
            if final.exists():
                shutil.rmtree(final)
            _rename(aside, final)
            notes.append(f"{final.name} restored from {aside.name} (a run stopped while saving that step again)")
    return notes


def checkpoint_problem(path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or None: the marker, megatron's metadata and common
    state, and every file its torch DCP index names, present and at least as long as the index says."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not path.is_dir():
        return "it does not exist"
    for name in (MARKER, "metadata.json", "common.pt", ".metadata"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((path / MARKER).read_text())
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable index makes the checkpoint unusable
        return f"its index cannot be read ({type(e).__name__}: {e})"
    need: dict[str, int] = {}
    for info in index.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size < size:
            return f"{name} is truncated ({f.stat().st_size} of {size} bytes)"
    try:
        torch.load(path / "common.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        return f"common.pt cannot be read ({type(e).__name__}: {e})"
    return None


def set_aside_unreadable(path: Path) -> Path:
    """Rename an unreadable checkpoint out of the way (kept for inspection, never loaded or counted)."""
    aside = path.with_name(f"{UNREADABLE_PREFIX}{path.name}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{UNREADABLE_PREFIX}{path.name}.{n}")
    _rename(path, aside)
    return aside


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


class CheckpointLoadError(FileNotFoundError):
    """``checkpoint.load`` names a folder that cannot be loaded; the message says why."""


@dataclass
class ResumeChoice:
    """Where a run starts: ``path`` (None: step 0) and why, plus what was found on the way (warnings)."""

    path: str | None
    reason: str
    warnings: list[str] = field(default_factory=list)


def choose_resume_point(root, initial_load: str | None = None) -> ResumeChoice:
    """Rank 0 only (the caller broadcasts the choice): the newest readable complete checkpoint under ``root``;
    ``initial_load`` (``checkpoint.load``) only when ``root`` holds none, as torchtitan's initial_load_path.

    Unreadable checkpoints (a shard missing or cut short) are set aside as ``.unreadable-step_N`` and the
    previous one is taken, saying so; torn writes (``.tmp-``, or no marker) are reported and skipped.
    """
    root = Path(root)
    warnings = recover_replaced(root)
    if root.is_dir():
        for torn in sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)
                           or (p.name.startswith(PREFIX) and not (p / MARKER).exists())):
            warnings.append(f"checkpoint {torn} is incomplete (its write was interrupted): skipped")
    unreadable = []
    for ckpt in reversed(complete_checkpoints(root)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            reason = "the newest complete checkpoint of this run folder"
            if unreadable:
                reason = f"the newest readable checkpoint of this run folder; {', '.join(unreadable)}"
            if initial_load:
                reason += f"; checkpoint.load={initial_load} is only for a run folder without one, so it is not used"
            return ResumeChoice(str(ckpt), reason, warnings)
        aside = set_aside_unreadable(ckpt)
        warnings.append(f"checkpoint {ckpt} is unreadable ({problem}): set aside as {aside.name}; "
                        f"falling back to the previous one")
        unreadable.append(f"{ckpt.name} is unreadable")
    none_here = "this run folder has no complete checkpoint" + (" left" if unreadable else "")
    if initial_load:
        problem = checkpoint_problem(initial_load)
        if problem is not None:
            raise CheckpointLoadError(f"checkpoint.load={initial_load} cannot be loaded: {problem} (it must be a "
                                      f"complete step_N folder with {MARKER})")
        return ResumeChoice(str(initial_load), f"checkpoint.load ({none_here} yet)", warnings)
    return ResumeChoice(None, f"{none_here}: starting at step 0", warnings)


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
