"""Bytes per rank on the wire, by collective and process group: the DiT block's (``block_bytes``, equal to the bytes
counted from every collective call on gloo: tests/test_ring_attention.py, bench/bench_dit_comm.py) and a training
step's (``step_collectives``), and which link each group runs on (``group_link``).

Wire bytes = what a rank sends with a bandwidth-optimal algorithm on a group of n (bench/_collective_counter.py):
all-gather (n-1) x its input, reduce-scatter (n-1) x its output, all-reduce 2 (n-1)/n x the tensor, all-to-all
(n-1)/n x its input, a ring step the key/value block it sends.
"""

from __future__ import annotations

from dataclasses import dataclass

from megawan.models.dit_config import WanDiTConfig
from megawan.training.budget import dit_param_counts


def padded_tokens(tokens: int, tp: int, cp: int, sequence_parallel: bool = True) -> int:
    """Tokens after the model pads them to a multiple of cp x (tp under SP) (megawan/layers/token_shards.py)."""
    unit = cp * (tp if sequence_parallel else 1)
    return -(-tokens // unit) * unit


def block_bytes(tp, cp, sp, padded_tokens, batch, dim, elem, text_len=512, cp_impl="ulysses",
                ulysses_size=None) -> dict:
    """{phase: {(collective, group, tag): (calls, wire bytes)}} of one block (fwd and bwd) under Megatron TP(+SP)
    and context parallelism of u x r ranks (Ulysses u = cp, ring u = 1, hybrid u = ulysses_size); Lc = padded
    tokens / cp, B = batch, D = dim, s = ``elem`` bytes of the compute dtype:

    * SP on: 3 all-gathers + 3 reduce-scatters of Lc x B x D (fused q/k/v, cross q, fc1 in; o, cross o, fc2 out);
      SP off: 3 all-reduces; q/k norms: 4 all-reduces of the fp32 sums of squares (3 Lc video rows, Lt text rows);
    * Ulysses part (u > 1): 4 all-to-alls (q, k, v, out) of Lc x B x D/t, each (u-1)/u on the wire, forward
      and backward, over the CP group (pure Ulysses) or the Ulysses group (hybrid);
    * ring part (r > 1): a key/value block is [u Lc, B, H/(t u), d] = 2 Lc B D/t elements for k and v;
      forward sends r-1 of them (one batch_isend_irecv per step); backward sends them again (r-1) and
      r fp32 key/value gradient blocks of the same shape, over the CP group (pure ring) or the ring group;
    * backward: the same with all-gather and reduce-scatter swapped, plus, under SP, Megatron's re-gather of
      the 3 column-parallel inputs (3 more all-gathers: memory traded for bytes).
    """
    lc = padded_tokens // cp
    u = {"ulysses": cp, "ring": 1, "hybrid": ulysses_size}[cp_impl]
    r = cp // u
    act = lc * batch * dim * elem
    fwd = {}
    if tp > 1:
        if sp:
            fwd[("all_gather_into_tensor", "tp", "")] = (3, 3 * act * (tp - 1) / tp)
            fwd[("reduce_scatter_tensor", "tp", "")] = (3, 3 * act * (tp - 1) / tp)
        else:
            fwd[("all_reduce", "tp", "")] = (3, 3 * 2 * act * (tp - 1) / tp)
        fwd[("all_reduce", "tp", "qk-norm sum-sq")] = (4, 2 * (tp - 1) / tp * 4 * batch * (3 * lc + text_len))
    hybrid = u > 1 and r > 1
    if u > 1:
        fwd[("all_to_all_single", "ulysses" if hybrid else "cp", "")] = (4, 4 * act / tp * (u - 1) / u)
    bwd = dict(fwd)
    if r > 1:
        kv = 2 * act / tp  # k and v of one ring block, compute dtype
        ring = "ring" if hybrid else "cp"
        fwd[("batch_isend_irecv", ring, "")] = (r - 1, (r - 1) * kv)
        bwd[("batch_isend_irecv", ring, "")] = (2 * r - 1, (r - 1) * kv + r * kv / elem * 4)
    if tp > 1 and sp:  # the column layers re-gather their saved local input shard
        bwd[("all_gather_into_tensor", "tp", "")] = (6, 6 * act * (tp - 1) / tp)
    return {"fwd": fwd, "bwd": bwd}


def recompute_bytes(block_fwd: dict, granularity: str | None) -> dict:
    """{key: wire bytes} a recomputing block's backward sends again (UNTESTED: no test counts them): "full"
    reruns the forward; "selective" reruns everything but the attention cores (torch's selective checkpoint:
    the ring's sends, inside the kept ring op, are not resent); "ffn" reruns fc1's all-gather and fc2's
    reduce-scatter (one third of the forward's SP collectives)."""
    if granularity is None:
        return {}
    if granularity == "full":
        return {k: v[1] for k, v in block_fwd.items()}
    if granularity == "selective":
        return {k: v[1] for k, v in block_fwd.items() if k[0] != "batch_isend_irecv"}
    return {k: v[1] / 3 for k, v in block_fwd.items()
            if k[0] in ("all_gather_into_tensor", "reduce_scatter_tensor") or (k[0] == "all_reduce" and not k[2])}


# ---- where each group runs ---------------------------------------------------------------------------------

def group_members(group: str, tp: int, cp: int, dp: int, ulysses: int) -> list[list[int]]:
    """Global ranks of every group of a kind, in megatron's rank order tp-cp-dp (TP fastest; hybrid CP: Ulysses
    groups of ``ulysses`` consecutive CP ranks, the ring across them): "tp", "cp", "ulysses", "ring", "dp_cp"
    (the gradient reduction's DP x CP group)."""
    world = tp * cp * dp
    stride, size = {"tp": (1, tp), "cp": (tp, cp), "ulysses": (tp, ulysses), "ring": (tp * ulysses, cp // ulysses),
                    "dp_cp": (tp, cp * dp)}[group]
    span = stride * size  # the ranks a group and its interleaved neighbours cover
    groups = []
    for base in range(0, world, span):
        for offset in range(stride):
            groups.append([base + offset + k * stride for k in range(size)])
    return groups


def group_link(group: str, tp: int, cp: int, dp: int, ulysses: int, gpus_per_node: int) -> str:
    """"nvlink" when every group of this kind lies inside one node, else "ib" (its bytes cross nodes)."""
    for members in group_members(group, tp, cp, dp, ulysses):
        if len({rank // gpus_per_node for rank in members}) > 1:
            return "ib"
    return "nvlink"


# ---- a training step ----------------------------------------------------------------------------------------

@dataclass
class Collective:
    """One collective kind on one group, per rank and optimizer step."""
    name: str  # e.g. "all_to_all_single (fwd)"
    group: str  # tp, cp, ulysses, ring, dp_cp
    link: str  # nvlink | ib
    wire_bytes: float
    phase: str  # fwd | bwd | recompute | grad-sync | param-gather
    counted: bool  # equal to bytes counted on gloo by tests/test_plan.py (exactly for the block fwd / bwd, within
    # megatron's bucket padding for the DP reduce-scatter and gather); False: analytic only


def step_collectives(cfg: WanDiTConfig, *, tokens: int, batch: int, accumulation: int, tp: int, cp: int, dp: int,
                     cp_impl: str, ulysses_size: int | None, gpus_per_node: int, recompute: str | None,
                     weight_bytes: float, sequence_parallel: bool = True, elem: int = 2) -> list[Collective]:
    """Every collective of one optimizer step, per rank: the blocks' (fwd, bwd, recomputation) for each
    micro-batch, then the gradient reduction and the parameter gather of megatron's distributed optimizer:

    * grad-sync: the fp32 grad buffer reduce-scattered over DP x CP ((n-1)/n x 4 B x local params), and under SP
      the TP all-reduce of the sequence-parallel params' grads (the replicated ones but the text embedder's);
    * param-gather: the updated params all-gathered over DP x CP ((n-1)/n x ``weight_bytes``, the rank's params
      in their own dtypes; megatron pads its buckets, a few hundred elements more).
    Not counted (small): the collectives outside the blocks (token scatter, text entry, head gather), the
    gradient-norm and finite-check all-reduces, and megatron's buffer padding."""
    u = {"ulysses": cp, "ring": 1, "hybrid": ulysses_size}[cp_impl]
    padded = padded_tokens(tokens, tp, cp, sequence_parallel)
    block = block_bytes(tp, cp, sequence_parallel, padded, batch, cfg.dim, elem, cfg.text_len, cp_impl,
                        ulysses_size)
    layers, micro = cfg.num_layers, accumulation
    sums: dict = {}

    def add(name, group, phase, wire, counted):
        key = (name, group, phase, counted)
        sums[key] = sums.get(key, 0.0) + wire

    for phase in ("fwd", "bwd"):
        for (kind, group, tag), (_, wire) in block[phase].items():
            add(kind + (f" ({tag})" if tag else ""), group, phase, wire * layers * micro, True)
    recomputing = 0 if recompute is None else layers
    for (kind, group, tag), wire in recompute_bytes(block["fwd"], recompute).items():
        add(kind + (f" ({tag})" if tag else ""), group, "recompute", wire * recomputing * micro, False)
    n = dp * cp
    split, replicated = dit_param_counts(cfg)
    if n > 1:
        local = split / tp + replicated
        add("reduce_scatter_tensor (grads, fp32)", "dp_cp", "grad-sync", (n - 1) / n * 4 * local, True)
        add("all_gather_into_tensor (params)", "dp_cp", "param-gather", (n - 1) / n * weight_bytes, True)
    if tp > 1 and sequence_parallel:
        text_embedder = cfg.text_dim * cfg.dim + cfg.dim + cfg.dim * cfg.dim + cfg.dim
        add("all_reduce (SP grads)", "tp", "grad-sync", 2 * (tp - 1) / tp * 4 * (replicated - text_embedder), False)
    out = []
    for (name, group, phase, counted), wire in sums.items():
        if wire:
            out.append(Collective(name, group, group_link(group, tp, cp, dp, u, gpus_per_node), wire, phase, counted))
    return out
