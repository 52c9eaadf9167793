"""Process groups for megawan: tensor (TP), context (CP), data (DP) and VAE spatial sharding.

``initialize(tp, cp)`` reads the launcher's environment (torchrun or SLURM), validates the layout
before anything is computed, starts torch.distributed (NCCL on GPUs, gloo on CPU), builds the
TP / CP / DP groups through megatron-core's ``parallel_state`` and returns a ``ParallelGroups``.

Modules never read globals: they take a ``ParallelGroups`` at construction. ``get_groups()``
returns the one built by ``initialize`` for callers that do not pass one explicitly.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megawan.parallel_state import cpu_compat
from megawan.parallel_state.layout import LayoutError, ParallelLayout

__all__ = [
    "LayoutError",
    "ParallelGroups",
    "ParallelLayout",
    "initialize",
    "get_groups",
    "is_initialized",
    "destroy",
    "launch_env",
]

DEFAULT_TIMEOUT_S = int(os.environ.get("MEGAWAN_DIST_TIMEOUT_S", "600"))


@dataclass(frozen=True)
class ParallelGroups:
    """The groups one rank takes part in, and its coordinates in the layout.

    Token sharding convention: a sequence is split into ``cp`` contiguous chunks (one per CP rank),
    and each chunk into ``tp`` contiguous pieces for sequence parallelism. ``tp_cp`` holds the TP x CP
    ranks of one model replica (used to gather full outputs); ``dp_cp`` is where gradients of
    replicated parameters are reduced; ``vae`` shards the VAE spatially.
    """

    tp_group: dist.ProcessGroup
    cp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    dp_cp_group: dist.ProcessGroup
    vae_group: dist.ProcessGroup
    tp: int
    cp: int
    dp: int
    tp_rank: int
    cp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(world_size=self.tp * self.cp * self.dp, tp=self.tp, cp=self.cp)


_GROUPS: ParallelGroups | None = None


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-010,012],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_env() -> dict:
    """Rank, world size, local rank and rendezvous address from torchrun or SLURM (srun) variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    addr = env.get("MASTER_ADDR")
    if addr is None:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = _first_slurm_host(nodelist) if nodelist else "127.0.0.1"
    port = env.get("MASTER_PORT")
    if port is None:
        job = env.get("SLURM_JOB_ID")
        port = str(20000 + int(job) % 20000) if job else "29500"
    return {"rank": rank, "world_size": world, "local_rank": local, "master_addr": addr, "master_port": port}


def initialize(
    tp: int = 1,
    cp: int = 1,
    *,
    vae_shards: int | None = None,
    num_heads: int | None = 24,
    backend: str | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
    seed: int = 1234,
) -> ParallelGroups:
    """Start torch.distributed (if needed) and build megawan's process groups.

    Args:
        tp, cp: tensor- and context-parallel sizes; dp = world_size / (tp * cp).
        vae_shards: ranks that shard one VAE call spatially (consecutive ranks); default tp * cp,
            i.e. the ranks of one model replica, which hold the same sample.
        num_heads: attention heads of the model to validate against (24 for TI2V-5B); None skips.
        backend: "nccl" or "gloo"; default $MEGAWAN_BACKEND if set, else NCCL when CUDA is
            available and gloo otherwise ("gloo" keeps the ranks on CPU even on a GPU machine).
        timeout_s: collective timeout, so a dead rank fails the job instead of hanging it.
        seed: seed of megatron's model-parallel RNG tracker.
    """
    global _GROUPS
    env = launch_env()
    world = dist.get_world_size() if dist.is_initialized() else env["world_size"]
    ParallelLayout(world_size=world, tp=tp, cp=cp).validate(num_heads)
    vae_shards = vae_shards or tp * cp
    if world % vae_shards != 0:
        raise LayoutError(f"vae_shards={vae_shards} does not divide world size {world}")

    backend = backend or os.environ.get("MEGAWAN_BACKEND") or None
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(env["local_rank"] % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        cpu_compat.apply()
        device = torch.device("cpu")
        # megatron builds dozens of groups; gloo would connect every pair of each at creation.
        # Lazy init connects a pair on its first collective, which makes start-up much faster.
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            init_method=f"tcp://{env['master_addr']}:{env['master_port']}",
            rank=env["rank"],
            world_size=env["world_size"],
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, timeout_s // 60),
        create_gloo_process_groups=False,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)  # megatron's per-TP-rank RNG streams (CPU stand-in on CPU)
    rank = dist.get_rank()
    vae_group = None
    for start in range(0, world, vae_shards):  # every rank must take part in every new_group call
        g = dist.new_group(list(range(start, start + vae_shards)))
        if start <= rank < start + vae_shards:
            vae_group = g
    _GROUPS = ParallelGroups(
        tp_group=mps.get_tensor_model_parallel_group(),
        cp_group=mps.get_context_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        dp_cp_group=mps.get_data_parallel_group(with_context_parallel=True),
        vae_group=vae_group,
        tp=tp,
        cp=cp,
        dp=world // (tp * cp),
        tp_rank=mps.get_tensor_model_parallel_rank(),
        cp_rank=mps.get_context_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(),
        device=device,
    )
    return _GROUPS


def is_initialized() -> bool:
    return _GROUPS is not None


def get_groups() -> ParallelGroups:
    """The groups built by ``initialize``; a single-process (1-rank gloo) layout if none was built."""
    if _GROUPS is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("torch.distributed is running with several ranks: call "
                               "megawan.parallel_state.initialize(tp=..., cp=...) first")
        if not dist.is_initialized():  # a lone process: a 1-rank group needs no rendezvous
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        return initialize(1, 1, num_heads=None)
    return _GROUPS


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    global _GROUPS
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    _GROUPS = None
    if dist.is_initialized():
        dist.destroy_process_group()
