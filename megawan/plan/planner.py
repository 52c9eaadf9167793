"""The layout planner: every valid layout of a cluster for one video size, with its memory (the trainer's own
pre-flight, ``training.preflight.memory_check``), its bytes per step by collective and link
(``plan.comm.step_collectives``) and a predicted step time (compute from FLOPs at measured rates, exposed
communication from stated link rates: ``plan.hardware``), ranked fastest first.

A layout: tp x cp (Ulysses, ring or hybrid u x r) x dp, a recomputation granularity (none, ffn, selective, full)
and a micro-batch; the global batch (samples per optimizer step) is fixed, so dp x micro-batch x accumulation is
the same for every row and the step times compare. Sequence parallelism is always on (off costs memory and saves
no bytes). The rules are ``ParallelLayout.validate``'s, which ``parallel_state.initialize`` enforces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megawan.models.dit_config import WanDiTConfig
from megawan.parallel_state.layout import LayoutError, ParallelLayout
from megawan.plan import hardware
from megawan.plan.comm import Collective, padded_tokens, step_collectives
from megawan.training.budget import (GIB, RECOMPUTE_ORDER, block_flops, block_flops_parts, dit_flops,
                                     dit_param_counts)
from megawan.training.config import TrainConfig, load_config
from megawan.training.preflight import MemoryCheck, memory_check

DEFAULT_BASE_CONFIG = "ti2v5b_720p"  # captioned videos from a latent cache, bf16, EMA: the recipe at any size


class PlanError(ValueError):
    """A cluster or video the planner cannot plan for; the message says why."""


@dataclass(frozen=True)
class Problem:
    gpus: int
    gpus_per_node: int = 8
    gpu: str = "h100"
    frames: int = 121
    height: int = 704
    width: int = 1280
    global_batch: int | None = None  # samples per optimizer step; None = one per GPU
    micro_batches: tuple[int, ...] = (1,)
    model: str = "wan2.2-ti2v-5b"
    mode: str = "compiled"  # compiled | eager blocks (model.compile_blocks)
    base_config: str = DEFAULT_BASE_CONFIG

    def check(self) -> "Problem":
        if self.gpu not in hardware.GPUS:
            raise PlanError(f"--gpu {self.gpu!r}: known GPUs are {', '.join(hardware.GPUS)}")
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise PlanError(f"--gpus and --gpus-per-node must be >= 1 (got {self.gpus}, {self.gpus_per_node})")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise PlanError(f"--gpus {self.gpus} is not a whole number of nodes of {self.gpus_per_node}")
        if (self.frames - 1) % 4:
            raise PlanError(f"--frames must be 4n + 1 (the VAE's causal time compression), got {self.frames}")
        if self.height % 32 or self.width % 32:
            raise PlanError(f"--size must be multiples of 32 (VAE x16, then the DiT's 2 x 2 patches), got "
                            f"{self.height}x{self.width}")
        if self.mode not in hardware.MEASURED_BLOCK_TFLOPS:
            raise PlanError(f"mode must be one of {tuple(hardware.MEASURED_BLOCK_TFLOPS)}, got {self.mode!r}")
        if self.batch < 1 or any(b < 1 for b in self.micro_batches):
            raise PlanError(f"--global-batch and --batch must be >= 1, got {self.batch}, {list(self.micro_batches)}")
        return self

    @property
    def batch(self) -> int:
        return self.global_batch or self.gpus

    @property
    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 16, self.width // 16


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    dp: int
    cp_impl: str
    ulysses_size: int | None
    recompute: str | None
    micro_batch: int
    accumulation: int

    @property
    def ulysses(self) -> int:
        return {"ulysses": self.cp, "ring": 1, "hybrid": self.ulysses_size}[self.cp_impl]

    @property
    def name(self) -> str:
        cp = "" if self.cp == 1 else {"ulysses": " Ulysses", "ring": " ring",
                                      "hybrid": f" hybrid {self.ulysses_size}x{self.cp // (self.ulysses_size or 1)}"
                                      }[self.cp_impl]
        return f"TP{self.tp} x CP{self.cp}{cp} x DP{self.dp}"


@dataclass
class StepTime:
    """Predicted seconds of one optimizer step on one rank."""
    compute: float  # blocks fwd + bwd, outside the blocks, for every micro-batch
    recompute: float  # the recomputed forwards (part of compute)
    optimizer: float  # the distributed optimizer's step (HBM-bound)
    exposed: dict  # exposed communication by kind: tp, ulysses, ring, dp (grad-sync + param-gather)

    @property
    def communication(self) -> float:
        return sum(self.exposed.values())

    @property
    def total(self) -> float:
        return self.compute + self.optimizer + self.communication


@dataclass
class Row:
    layout: Layout
    memory: MemoryCheck
    collectives: list[Collective]
    time: StepTime
    config: TrainConfig

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def link_bytes(self, link: str) -> float:
        return sum(c.wire_bytes for c in self.collectives if c.link == link)

    def to_dict(self) -> dict:
        est, res = self.memory.estimate, self.memory.reserve
        return {
            "layout": dataclasses.asdict(self.layout), "name": self.layout.name, "fits": self.fits,
            "memory_gib": {"weights": est.weights / GIB, "grads": est.grads / GIB, "optimizer": est.optimizer / GIB,
                           "activations": est.activations / GIB, "reserve": res.total / GIB,
                           "reserve_parts": {k: getattr(res, k) / GIB for k in
                                             ("cuda_context", "nccl", "fragmentation", "vae")},
                           "total": self.memory.total / GIB, "capacity": self.memory.capacity / GIB},
            "bytes_per_step": {"nvlink": self.link_bytes("nvlink"), "ib": self.link_bytes("ib"),
                               "by_collective": [dataclasses.asdict(c) for c in self.collectives]},
            "seconds": {"total": self.time.total, "compute": self.time.compute, "recompute": self.time.recompute,
                        "optimizer": self.time.optimizer, "exposed_communication": self.time.exposed},
        }


# ---- enumeration --------------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(problem: Problem, heads: int):
    """Every layout ``initialize()`` accepts for these GPUs and heads (TP inside a node), with a micro-batch and
    accumulation that make the global batch."""
    world = problem.gpus
    for tp in _divisors(min(world, problem.gpus_per_node)):
        for cp in _divisors(world // tp):
            dp = world // (tp * cp)
            impls = [("ulysses", None)] + ([("ring", None)] if cp > 1 else []) + \
                [("hybrid", u) for u in _divisors(cp) if 1 < u < cp]
            for impl, u in impls:
                try:
                    ParallelLayout(world, tp, cp, impl, u).validate(heads)
                except LayoutError:
                    continue
                for micro in problem.micro_batches:
                    if problem.batch % (dp * micro):
                        continue
                    for recompute in RECOMPUTE_ORDER:
                        yield Layout(tp, cp, dp, impl, u, recompute, micro, problem.batch // (dp * micro))


def train_config(base: TrainConfig, problem: Problem, layout: Layout) -> TrainConfig:
    """The run config of a layout: the base config with the layout, the clip length and the batch split."""
    model = dataclasses.replace(base.model, activation_checkpointing=layout.recompute is not None,
                                recompute_granularity=layout.recompute or "full", recompute_num_blocks=None,
                                compile_blocks=None if problem.mode == "compiled" else False)
    parallel = dataclasses.replace(base.parallel, tp=layout.tp, cp=layout.cp, sequence_parallel=True,
                                   cp_impl=layout.cp_impl, ulysses_size=layout.ulysses_size)
    data = dataclasses.replace(base.data, clip_frames=problem.frames, batch_size=layout.micro_batch)
    optim = dataclasses.replace(base.optim, grad_accumulation=layout.accumulation)
    logging = dataclasses.replace(base.logging, peak_tflops=hardware.GPUS[problem.gpu].peak_tflops)
    return dataclasses.replace(base, model=model, parallel=parallel, data=data, optim=optim, logging=logging)


# ---- time ---------------------------------------------------------------------------------------------------

def per_token_seconds(cfg: WanDiTConfig, gpu: hardware.GPU, mode: str) -> dict:
    """Seconds per token per block ({"fwd", "fwd+bwd"}) of what is not a GEMM or an attention core: what the
    measured block time at ``hardware.MEASURED_TOKENS`` leaves after its kernels at their measured rates,
    scaled by width from the measured 3072 (the 5B's)."""
    L = hardware.MEASURED_TOKENS
    gemm, _, core = block_flops_parts(L, 3072, 14336, 512)
    out = {}
    for phase, factor in (("fwd", 1), ("fwd+bwd", 3)):
        measured = factor * (gemm + core) / (hardware.MEASURED_BLOCK_TFLOPS[mode][phase] * hardware.TFLOPS)
        kernels = factor * gemm / (gpu.gemm_tflops * hardware.TFLOPS) + \
            factor * core / (gpu.attention_tflops[phase] * hardware.TFLOPS)
        out[phase] = (measured - kernels) / L * cfg.dim / 3072
    return out


def block_seconds(cfg: WanDiTConfig, gpu: hardware.GPU, mode: str, tokens: int, batch: int = 1,
                  shards: int = 1) -> dict:
    """Predicted seconds of one block on one rank holding 1/``shards`` of ``batch`` samples of ``tokens``:
    {"fwd", "fwd+bwd", "gemm_fwd", "ffn_gemm_fwd", "attention_fwd", "attention_bwd", "per_token_fwd"}."""
    gemm, ffn, core = (batch * f / shards for f in block_flops_parts(tokens, cfg.dim, cfg.ffn_dim, cfg.text_len))
    local = batch * tokens / shards
    per_token = per_token_seconds(cfg, gpu, mode)
    rate = hardware.TFLOPS
    attention_fwd = core / (gpu.attention_tflops["fwd"] * rate)
    attention_all = 3 * core / (gpu.attention_tflops["fwd+bwd"] * rate)
    return {"fwd": gemm / (gpu.gemm_tflops * rate) + attention_fwd + per_token["fwd"] * local,
            "fwd+bwd": 3 * gemm / (gpu.gemm_tflops * rate) + attention_all + per_token["fwd+bwd"] * local,
            "gemm_fwd": gemm / (gpu.gemm_tflops * rate), "ffn_gemm_fwd": ffn / (gpu.gemm_tflops * rate),
            "attention_fwd": attention_fwd, "attention_bwd": attention_all - attention_fwd,
            "per_token_fwd": per_token["fwd"] * local}


def recompute_seconds(block: dict, granularity: str | None) -> float:
    """A recomputing block's extra forward: all of it ("full"), all but the attention cores ("selective"), the
    FFN's GEMMs and its share (by GEMM FLOPs) of the per-token work ("ffn": that share is UNTESTED)."""
    if granularity is None:
        return 0.0
    if granularity == "full":
        return block["fwd"]
    if granularity == "selective":
        return block["gemm_fwd"] + block["per_token_fwd"]
    return block["ffn_gemm_fwd"] * (1 + block["per_token_fwd"] / block["gemm_fwd"])


# optimizer step bytes per parameter of the rank's shard: grad read (4), fp32 master, Adam m, v read + written
# (24), the bf16/fp32 param written back (<= 4), the grad-norm read (4); the EMA reads + writes 8 more
OPTIMIZER_BYTES_PER_PARAM = 36
EMA_BYTES_PER_PARAM = 8


def step_time(cfg: WanDiTConfig, problem: Problem, layout: Layout, tokens: int, collectives: list[Collective],
              ema: bool) -> StepTime:
    gpu = hardware.GPUS[problem.gpu]
    padded = padded_tokens(tokens, layout.tp, layout.cp)
    shards = layout.tp * layout.cp
    block = block_seconds(cfg, gpu, problem.mode, padded, layout.micro_batch, shards)
    recompute = recompute_seconds(block, layout.recompute)
    outside_flops = dit_flops(cfg, padded, layout.micro_batch) - 3 * layout.micro_batch * cfg.num_layers * \
        block_flops(padded, cfg.dim, cfg.ffn_dim, cfg.text_len)
    outside = outside_flops / shards / (gpu.gemm_tflops * hardware.TFLOPS)
    micro = cfg.num_layers * (block["fwd+bwd"] + recompute) + outside
    split, replicated = dit_param_counts(cfg)
    shard = (split / layout.tp + replicated) / (layout.dp * layout.cp)
    optimizer = shard * (OPTIMIZER_BYTES_PER_PARAM + (EMA_BYTES_PER_PARAM if ema else 0)) / (gpu.hbm_gbps * 1e9)

    seconds: dict = {}  # (kind, phase) -> seconds on the wire
    for c in collectives:
        kind = "dp" if c.group == "dp_cp" else "ring" if c.name.startswith("batch_isend_irecv") else \
            "ulysses" if c.name.startswith("all_to_all") else "tp"
        key = (kind, c.phase)
        seconds[key] = seconds.get(key, 0.0) + c.wire_bytes / (hardware.LINKS[c.link].gbps * hardware.GBPS)
    overlap = hardware.OVERLAP
    ring_steps = layout.cp // layout.ulysses
    hide = {  # compute each kind of communication can hide behind, per step
        ("ring", "fwd"): overlap["ring"] * layout.accumulation * cfg.num_layers * block["attention_fwd"]
        * (ring_steps - 1) / max(ring_steps, 1),
        ("ring", "bwd"): overlap["ring"] * layout.accumulation * cfg.num_layers * block["attention_bwd"]
        * (ring_steps - 1) / max(ring_steps, 1),
        ("ring", "recompute"): overlap["ring"] * layout.accumulation * cfg.num_layers * block["attention_fwd"]
        * (ring_steps - 1) / max(ring_steps, 1),
        ("dp", "grad-sync"): overlap["dp_grad_reduce"] * cfg.num_layers * (block["fwd+bwd"] - block["fwd"] + recompute),
        ("dp", "param-gather"): overlap["dp_param_gather"] * optimizer,
    }
    exposed: dict = {}
    for (kind, phase), t in seconds.items():
        hidden = hide.get((kind, phase), overlap.get(kind, 0.0) * t)
        exposed[kind] = exposed.get(kind, 0.0) + max(0.0, t - hidden)
    return StepTime(compute=layout.accumulation * micro, recompute=layout.accumulation * cfg.num_layers * recompute,
                    optimizer=optimizer, exposed=exposed)


# ---- the plan -----------------------------------------------------------------------------------------------

def evaluate(problem: Problem, layout: Layout, base: TrainConfig, dit: WanDiTConfig) -> Row:
    gpu = hardware.GPUS[problem.gpu]
    cfg = train_config(base, problem, layout)
    check = memory_check(cfg, dit, problem.gpus, "cuda", gpu.memory_bytes, latent=problem.latent)
    collectives = step_collectives(dit, tokens=check.tokens, batch=layout.micro_batch,
                                   accumulation=layout.accumulation, tp=layout.tp, cp=layout.cp, dp=layout.dp,
                                   cp_impl=layout.cp_impl, ulysses_size=layout.ulysses_size,
                                   gpus_per_node=min(problem.gpus_per_node, problem.gpus),
                                   recompute=layout.recompute, weight_bytes=check.estimate.weights,
                                   elem=2 if cfg.model.dtype == "bfloat16" else 4)
    time = step_time(dit, problem, layout, check.tokens, collectives, ema=cfg.optim.ema_decay > 0)
    return Row(layout, check, collectives, time, cfg)


def plan(problem: Problem) -> list[Row]:
    """Every layout's row, fitting ones first, fastest first."""
    problem.check()
    base = load_config(problem.base_config)
    dit = WanDiTConfig.load(problem.model)
    if base.model.state_dim:
        dit = dataclasses.replace(dit, state_dim=base.model.state_dim)
    rows = [evaluate(problem, layout, base, dit) for layout in layouts(problem, dit.num_heads)]
    if not rows:
        raise PlanError(f"no layout of {problem.gpus} GPUs makes a global batch of {problem.batch} with micro-batches "
                        f"{list(problem.micro_batches)}: pass --global-batch as a multiple of the DP sizes")
    return sorted(rows, key=lambda r: (not r.fits, r.time.total, r.memory.total))


def explain(rows: list[Row]) -> str:
    """One line: why the top row is the choice."""
    top = rows[0]
    if not top.fits:
        smallest = min(rows, key=lambda r: r.memory.total)
        return (f"nothing fits: the smallest, {smallest.layout.name} with {smallest.layout.recompute or 'no'} "
                f"recomputation, needs {smallest.memory.total / GIB:.1f} GiB of {smallest.memory.capacity / GIB:.1f}; "
                f"use more GPUs, shorter clips or a smaller frame size")
    t, lay = top.time, top.layout
    parts = [f"{lay.name}, {lay.recompute or 'no'} recomputation, micro-batch {lay.micro_batch} x "
             f"{lay.accumulation}: the fastest of {sum(r.fits for r in rows)} layouts that fit "
             f"({t.total:.2f} s/step = compute {t.compute:.2f} + exposed communication {t.communication:.2f} + "
             f"optimizer {t.optimizer:.2f}; {top.memory.total / GIB:.1f} of {top.memory.capacity / GIB:.1f} GiB)"]
    same = [r for r in rows if dataclasses.replace(r.layout, recompute=None) == dataclasses.replace(lay, recompute=None)]
    lighter = [r for r in same if RECOMPUTE_ORDER.index(r.layout.recompute) < RECOMPUTE_ORDER.index(lay.recompute)]
    if lighter:
        r = min(lighter, key=lambda r: r.memory.total)
        parts.append(f"{r.layout.recompute or 'no'} recomputation needs {r.memory.total / GIB:.1f} GiB")
    smaller = [r for r in rows if r.layout.tp * r.layout.cp < lay.tp * lay.cp]
    if smaller:
        fitting = [r for r in smaller if r.fits]
        if fitting:
            r = fitting[0]
            parts.append(f"fewer model-parallel ranks ({r.layout.name}, {r.layout.recompute or 'no'} recomputation) take "
                         f"{r.time.total:.2f} s")
        else:
            parts.append(f"no layout with fewer than {lay.tp * lay.cp} model-parallel ranks fits")
    across = sorted({c.group for c in top.collectives if c.link == "ib"})
    parts.append("communication across nodes: " + (", ".join(across) if across else "none"))
    return "; ".join(parts)
