"""``ParallelGroups`` (one rank's groups and coordinates) and the calls that build or tear them down.

``initialize(tp, cp)`` reads the launcher's environment (torchrun or SLURM), validates the layout
before anything is computed, starts torch.distributed (NCCL on GPUs, gloo on CPU), builds the
TP / CP / DP groups through megatron-core's ``parallel_state`` and returns a ``ParallelGroups``.
``get_groups()`` returns the one built by ``initialize`` for callers that do not pass one explicitly.

Rank order (megatron's tp-cp-dp: TP varies fastest). With ``cp_impl="hybrid"`` and ``ulysses_size=u``
the CP group (cp = u x r ranks, cp rank c) is split by megatron-core's hierarchical CP groups
(``hierarchical_context_parallel_sizes=[u, r]``): the Ulysses group of c holds the u consecutive CP
ranks (c // u) * u .. (c // u) * u + u - 1 (ulysses rank c % u), the ring group the r ranks c % u, c % u + u, ...
(ring rank c // u). In global ranks a Ulysses group with its TP groups is tp * u consecutive ranks: on
nodes of tp * u GPUs the all-to-alls stay inside a node (NVLink) and only the ring's point-to-point
sends cross nodes. Ulysses group j holds the contiguous tokens of CP ranks j*u .. j*u + u - 1, so after
its all-to-all it holds block j of the ring's sequence.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megawan.parallel_state import cpu_compat
from megawan.parallel_state.launch import default_timeout_s, launch_env, start_process_group
from megawan.parallel_state.layout import LayoutError, ParallelLayout


@dataclass(frozen=True)
class ContextParallelGroups:
    """How one rank's self-attention spans its CP group: an all-to-all over ``ulysses_group``
    (``ulysses`` ranks), then ring attention over ``ring_group`` (``ring`` ranks). A group is None
    where its size is 1. ulysses = cp, ring = 1: pure Ulysses; ulysses = 1, ring = cp: pure ring."""

    impl: str
    ulysses: int
    ring: int
    ulysses_group: object = None
    ring_group: object = None


@dataclass(frozen=True)
class ParallelGroups:
    """The groups one rank takes part in, and its coordinates in the layout.

    Token sharding convention: a sequence is split into ``cp`` contiguous chunks (one per CP rank),
    and each chunk into ``tp`` contiguous pieces for sequence parallelism. ``dp_cp`` is where
    gradients of replicated parameters are reduced; ``vae`` shards the VAE spatially (by default the
    TP x CP ranks of one model replica, which hold the same sample).
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
    # How the CP group was built (``initialize(cp_impl=..., ulysses_size=...)``); hybrid_groups holds
    # (Ulysses group, ring group) when it was built for hybrid with 1 < ulysses_size < cp.
    cp_impl: str = "ulysses"
    ulysses_size: int | None = None
    hybrid_groups: tuple = ()

    @property
    def layout(self) -> ParallelLayout:
        return self.layout_for()

    def layout_for(self, cp_impl: str | None = None, ulysses_size: int | None = None) -> ParallelLayout:
        """This layout with context parallelism ``cp_impl`` (None: the one these groups were built for)."""
        if cp_impl is None:
            cp_impl, ulysses_size = self.cp_impl, self.ulysses_size
        return ParallelLayout(world_size=self.tp * self.cp * self.dp, tp=self.tp, cp=self.cp, cp_impl=cp_impl,
                              ulysses_size=ulysses_size)

    def context_parallel(self, cp_impl: str | None = None, ulysses_size: int | None = None) -> ContextParallelGroups:
        """The groups of ``cp_impl`` (None: the one these groups were built for) on this CP group.

        "ulysses" and "ring" run on the CP group itself, so any groups serve them; "hybrid" with
        1 < ulysses_size < cp needs the sub-groups ``initialize`` built for that ulysses_size.
        """
        layout = self.layout_for(cp_impl, ulysses_size).validate()
        cp_impl, u, r = layout.cp_impl, layout.ulysses, layout.ring
        cp_group = self.cp_group if self.cp > 1 else None
        if r == 1:
            return ContextParallelGroups(cp_impl, u, 1, ulysses_group=cp_group)
        if u == 1:
            return ContextParallelGroups(cp_impl, 1, r, ring_group=cp_group)
        if (self.cp_impl, self.ulysses_size) != ("hybrid", u) or not self.hybrid_groups:
            raise LayoutError(f"cp_impl 'hybrid' with ulysses_size={u} needs the process groups built for it: "
                              f"parallel_state.initialize(tp, cp, cp_impl='hybrid', ulysses_size={u}) (these "
                              f"were built for cp_impl={self.cp_impl!r}, ulysses_size={self.ulysses_size})")
        return ContextParallelGroups(cp_impl, u, r, *self.hybrid_groups)

    @classmethod
    def single_rank(cls, device: torch.device) -> "ParallelGroups":
        """A tp = cp = dp = 1 layout on this rank alone, inside a running multi-rank job.

        Collective: every rank must call it (each ``new_group`` call involves every rank). Used to
        compare a parallel run with the same model on one rank.
        """
        mine = None
        for r in range(dist.get_world_size()):
            g = dist.new_group([r])
            if r == dist.get_rank():
                mine = g
        return cls(mine, mine, mine, mine, mine, tp=1, cp=1, dp=1, tp_rank=0, cp_rank=0, dp_rank=0,
                   device=device)


_GROUPS: ParallelGroups | None = None


def initialize(
    tp: int = 1,
    cp: int = 1,
    *,
    cp_impl: str = "ulysses",
    ulysses_size: int | None = None,
    vae_shards: int | None = None,
    num_heads: int | None = None,
    backend: str | None = None,
    timeout_s: int | None = None,
    seed: int = 1234,
) -> ParallelGroups:
    """Start torch.distributed (if needed) and build megawan's process groups.

    Args:
        tp, cp: tensor- and context-parallel sizes; dp = world_size / (tp * cp).
        cp_impl: "ulysses" (all-to-all; (heads / tp) % cp == 0), "ring" (ring attention; any cp) or
            "hybrid" (Ulysses inside groups of ``ulysses_size`` consecutive CP ranks, ring across them;
            see the module docstring for the rank order). The model may still run "ulysses" or "ring"
            on groups built for another impl (``ParallelGroups.context_parallel``).
        ulysses_size: for "hybrid" only: the Ulysses group size, dividing cp.
        vae_shards: ranks that shard one VAE call spatially (consecutive ranks); default tp * cp,
            i.e. the ranks of one model replica, which hold the same sample.
        num_heads: optionally, a model's attention heads to validate the layout against before any
            process group starts (the model validates its own heads when it is built anyway).
        backend: "nccl" or "gloo"; default $MEGAWAN_BACKEND if set, else NCCL when CUDA is
            available and gloo otherwise ("gloo" keeps the ranks on CPU even on a GPU machine).
        timeout_s: collective timeout, so a dead rank fails the job instead of hanging it (default:
            ``launch.default_timeout_s()``, i.e. $MEGAWAN_DIST_TIMEOUT_S or 600).
        seed: seed of megatron's model-parallel RNG tracker.
    """
    global _GROUPS
    env = launch_env()
    world = dist.get_world_size() if dist.is_initialized() else env["world_size"]
    layout = ParallelLayout(world_size=world, tp=tp, cp=cp, cp_impl=cp_impl, ulysses_size=ulysses_size)
    layout.validate(num_heads)
    hierarchical = 1 < layout.ulysses < cp and layout.ring > 1
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
    timeout_s = default_timeout_s() if timeout_s is None else timeout_s
    start_process_group(env, backend or ("nccl" if use_cuda else "gloo"), timeout_s)

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        # hybrid: megatron-core's hierarchical CP groups, level 0 = Ulysses, level 1 = ring
        hierarchical_context_parallel_sizes=[layout.ulysses, layout.ring] if hierarchical else None,
        distributed_timeout_minutes=max(1, timeout_s // 60),
        create_gloo_process_groups=False,
    )
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
        cp_impl=cp_impl,
        ulysses_size=ulysses_size,
        hybrid_groups=tuple(mps.get_hierarchical_context_parallel_groups()) if hierarchical else (),
    )
    return _GROUPS


def is_initialized() -> bool:
    return _GROUPS is not None


def get_groups() -> ParallelGroups:
    """The groups built by ``initialize``.

    In a lone process where nothing was initialised (a notebook, a test) it starts what a 1-rank run
    needs, and warns that it did: a 1-rank gloo process group (in-memory store, no rendezvous) and
    megatron's groups for tp = cp = 1. With several ranks running it refuses instead.
    """
    if _GROUPS is not None:
        return _GROUPS
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("torch.distributed is running with several ranks: call "
                           "megawan.parallel_state.initialize(tp=..., cp=...) first")
    if not dist.is_initialized():
        warnings.warn("megawan.parallel_state.get_groups(): nothing initialised, starting a 1-rank gloo "
                      "process group and tp = cp = 1 groups (call initialize() to choose)", stacklevel=2)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return initialize(1, 1)


def destroy() -> None:
    """Tear down megatron's groups and the default process group."""
    global _GROUPS
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    _GROUPS = None
    if dist.is_initialized():
        dist.destroy_process_group()
