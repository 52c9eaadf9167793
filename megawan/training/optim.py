"""megatron-core's DDP, distributed optimizer and LR schedule around a WanDiT, and the EMA of its master weights.

- ``DistributedDataParallel``: bucketed gradient reduction over the DP x CP ranks into an fp32 grad
  buffer (``param.main_grad``); averaging divides by dp * cp, and the trainer scales the loss by cp
  because each CP rank's gradient is a partial sum over its tokens (as Megatron's own loss functions do).
- Replicated parameters tagged ``sequence_parallel`` (their gradients are partial sums over this rank's
  SP tokens) are all-reduced over TP after the DP reduction: ``finish_grad_sync``.
- The distributed optimizer (ZeRO-1): fp32 master weights and Adam moments sharded over DP x CP;
  gradient clipping by the true global norm (megatron counts a TP-replicated parameter once).
- ``OptimizerParamScheduler``: linear warmup, then cosine / linear decay to ``min_lr``; on a resume the
  run's config is in force (``override_opt_param_scheduler``, ``apply_optimizer_config``) and only the
  step count comes from the checkpoint.
- ``ShardedEMA``: the EMA of the fp32 master weights, sharded over DP x CP like the Adam moments.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig

from megawan.parallel_state import cpu_compat
from megawan.parallel_state.grads import all_reduce_flat


def process_groups(groups) -> ProcessGroupCollection:
    """megawan's groups for megatron's DDP and optimizer (their ``pg_collection``), so that megatron reduces
    and shards over the groups the model was built with, not over megatron's global ones.

    megawan has no pipeline or expert parallelism: the pipeline, expert and expert-data groups megatron also
    requires are megatron's own (built by ``parallel_state.initialize`` with sizes 1; no parameter uses
    them). The optimizer's instance group (its gradient-norm reduction) is every rank of the layout."""
    from megatron.core import parallel_state as mps

    pgs = ProcessGroupCollection()
    pgs.tp, pgs.cp, pgs.dp, pgs.dp_cp = groups.tp_group, groups.cp_group, groups.dp_group, groups.dp_cp_group
    pgs.mp = groups.tp_group  # model-parallel = TP x PP, and PP = 1
    layout_ranks = groups.tp * groups.cp * groups.dp
    if layout_ranks == dist.get_world_size():
        pgs.intra_dist_opt = dist.group.WORLD
    elif layout_ranks == 1:  # ParallelGroups.single_rank: this rank alone
        pgs.intra_dist_opt = groups.tp_group
    else:
        raise ValueError(f"a layout of {layout_ranks} ranks inside a job of {dist.get_world_size()}: "
                         f"megawan has no group for its optimizer instance")
    pgs.pp = mps.get_pipeline_model_parallel_group()
    pgs.ep = mps.get_expert_model_parallel_group()
    pgs.expt_dp = mps.get_expert_data_parallel_group()
    pgs.tp_ep_pp = mps.get_expert_tensor_model_pipeline_parallel_group()
    return pgs


def wrap_ddp(model, groups, *, bucket_size: int | None = None) -> DistributedDataParallel:
    """megatron DDP over DP x CP (megawan's groups, ``process_groups``). Its TransformerConfig only carries
    the parallel sizes and dtype."""
    cfg = model.config
    tcfg = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.dim, num_attention_heads=cfg.num_heads,
        tensor_model_parallel_size=groups.tp, context_parallel_size=groups.cp,
        sequence_parallel=model.sequence_parallel, bf16=model.runtime.dtype == torch.bfloat16,
        params_dtype=model.runtime.dtype, use_cpu_initialization=groups.device.type == "cpu",
        cuda_graph_scope=[])  # megatron's default ("full") is its deprecated spelling of [] and warns
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True,
        # overlapping needs CUDA streams; on CPU ranks the reduction runs after backward
        overlap_grad_reduce=groups.device.type == "cuda", bucket_size=bucket_size)
    return DistributedDataParallel(tcfg, ddp_config, model, pg_collection=process_groups(groups))


def build_optimizer(ddp: DistributedDataParallel, optim, groups, total_steps: int):
    """(optimizer, scheduler); on CPU ranks the optimizer runs through ``cpu_compat.on_cpu``."""
    bf16 = ddp.module.runtime.dtype == torch.bfloat16
    cpu_compat.torch_adam_reshardable_load()
    config = OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=bf16, params_dtype=ddp.module.runtime.dtype,
        use_distributed_optimizer=True)
    with cpu_compat.CudaAsCpu() if groups.device.type == "cpu" else contextlib.nullcontext():
        optimizer = get_megatron_optimizer(config, [ddp], use_gloo_process_groups=False,
                                           pg_collection=process_groups(groups))
    optimizer = cpu_compat.on_cpu(optimizer, groups.device)
    decay_steps = max(1, total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # a resume takes only the step count from the checkpoint: this run's config (run.steps, lr, min_lr,
        # warmup, decay style, weight decay) is the schedule in force (megatron's default would keep the
        # checkpoint's values and silently ignore a longer run or a new lr)
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return optimizer, scheduler


def finish_grad_sync(ddp: DistributedDataParallel, groups) -> None:
    """DP x CP reduction (megatron DDP), then the TP all-reduce of sequence-parallel-tagged grads."""
    ddp.finish_grad_sync()
    if groups.tp > 1 and ddp.module.sequence_parallel:
        grads = [p.main_grad for p in ddp.module.parameters() if getattr(p, "sequence_parallel", False)]
        if grads:
            all_reduce_flat(grads, groups.tp_group)


def grads_are_finite(ddp: DistributedDataParallel) -> bool:
    """Whether every rank's reduced gradients are finite (collective: all ranks agree)."""
    total = torch.zeros(1, dtype=torch.float32, device=next(ddp.module.parameters()).device)
    for p in ddp.module.parameters():
        if p.main_grad is not None:
            total += p.main_grad.float().sum()
    flag = torch.tensor([0.0 if torch.isfinite(total).all() else 1.0], device=total.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def distributed_optimizers(optimizer) -> list:
    """megatron's DistributedOptimizer instances behind ``optimizer`` (a ChainedOptimizer, maybe proxied)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def apply_optimizer_config(optimizer, optim) -> None:
    """Give every param group the config's hyper-parameters. A resume loads the checkpoint's param groups
    (max_lr, min_lr, betas, eps) into the optimizer; the run's config must win over them. The scheduler
    sets lr and weight_decay from max_lr / min_lr and its own start / end weight decay at every step."""
    for opt in distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            group.update(max_lr=optim.lr, min_lr=optim.min_lr, betas=(optim.adam_beta1, optim.adam_beta2),
                         eps=optim.adam_eps)


class MasterShard:
    """This rank's slice of one parameter in the distributed optimizer: the fp32 master tensor (a view of the
    parameter itself for fp32 parameters) and where it sits in the parameter and in the param buffer."""

    def __init__(self, opt, param, main, name: str):
        self.opt, self.param, self.main, self.name = opt, param, main, name
        ranges = opt._get_model_param_range_map(param)
        self.param_range = ranges["param"]  # [start, end) of the flattened parameter
        self.buffer_range = ranges["gbuf_world_in_bucket"]  # [start, end) of its bucket's param buffer
        gbuf_index, _, bucket_id = opt.model_param_gbuf_map[param]
        self.bucket = opt.buffers[gbuf_index].buckets[bucket_id]
        self.is_param_view = param.dtype == torch.float32  # fp32 params are their own master weights

    def param_buffer_slice(self) -> torch.Tensor:
        return self.bucket.param_data.view(-1)[self.buffer_range.start:self.buffer_range.end]


def master_shards(optimizer, model) -> list[MasterShard]:
    """Every (parameter, fp32 master slice) this rank's distributed optimizer updates (megatron's
    ``model_float16_groups`` / ``shard_fp32_from_float16_groups`` and ``model_fp32_groups`` /
    ``shard_fp32_groups``), in a fixed order."""
    names = {p: n for n, p in model.named_parameters()}
    out = []
    for opt in distributed_optimizers(optimizer):
        for model_groups, main_groups in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                                          (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for model_group, main_group in zip(model_groups, main_groups):
                out += [MasterShard(opt, p, main, names[p]) for p, main in zip(model_group, main_group)]
    return out


@torch.no_grad()
def gather_model_space(optimizer, model, values: dict) -> dict:
    """Full tensors (this rank's TP slice of each parameter, fp32, on the CPU) from per-rank optimizer slices.

    ``values`` maps a parameter name to this rank's slice of it (the layout of ``master_shards``). Each
    bucket's slices are all-gathered over the optimizer's DP x CP group, as megatron's own
    ``get_parameter_state_dp_zero`` does for the Adam state (a bucket at a time: the device holds one
    bucket, never a full copy). Collective over the DP x CP group; every rank gets every tensor.
    """
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for opt in distributed_optimizers(optimizer):
        for gbuf_index, buffer in enumerate(opt.buffers):
            group = buffer.data_parallel_group
            size = group.size()
            for range_maps in opt.gbuf_ranges[gbuf_index].values():
                for bucket_id, range_map in enumerate(range_maps):
                    bucket = buffer.buckets[bucket_id]
                    local = torch.zeros(bucket.grad_data.numel() // size, dtype=torch.float32,
                                        device=bucket.grad_data.device)
                    for p, r in range_map["param_map"].items():
                        local[r["gbuf_local"].start:r["gbuf_local"].end] = values[names[p]].view(-1)
                    parts = [torch.empty_like(local) for _ in range(size)]
                    dist.all_gather(parts, local, group=group)
                    flat = torch.cat(parts)
                    for p in bucket.params:
                        start, end, _ = buffer.param_index_map[p]
                        out[names[p]] = flat[start - bucket.offset:end - bucket.offset].view(p.shape).cpu()
    return out


class ShardedEMA:
    """Exponential moving average of the fp32 master weights, sharded as the distributed optimizer shards them.

    Each DP x CP rank keeps the EMA of exactly its optimizer slice of each parameter (4 bytes per parameter
    over dp x cp ranks, like one Adam moment) and updates it after every optimizer step from the fp32
    master weights, not from the bf16 model weights: at a small learning rate a step moves a weight by a
    fraction of a bf16 ulp, and an average of the rounded weights would average a staircase.
    ``ema <- decay * ema + (1 - decay) * master`` is one ``torch._foreach_lerp_`` over all slices.

    Checkpoints hold it as full (model-space) tensors ``ema.<param>``, gathered like megatron's
    ``fully_reshardable`` optimizer state, so it loads into any TP / CP / DP layout (``state_for_checkpoint``,
    ``load_full``).
    """

    def __init__(self, optimizer, model, decay: float):
        self.decay = decay
        self.optimizer, self.model = optimizer, model
        self.slices = master_shards(optimizer, model)
        self.shards = [s.main.detach().clone() for s in self.slices]  # starts at the master weights

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shards, [s.main for s in self.slices], 1.0 - self.decay)

    @torch.no_grad()
    def reset_to_master(self) -> None:
        """Start the average again at the current master weights (an EMA switched on when resuming)."""
        torch._foreach_copy_(self.shards, [s.main for s in self.slices])

    def numel(self) -> int:
        return sum(t.numel() for t in self.shards)

    def full_tensors(self) -> dict:
        """{parameter name: full fp32 EMA (this rank's TP slice), CPU}; collective over DP x CP."""
        return gather_model_space(self.optimizer, self.model, {s.name: t for s, t in zip(self.slices, self.shards)})

    @torch.no_grad()
    def load_full(self, tensors: dict) -> None:
        """Take this rank's slices of full (model-space) EMA tensors, e.g. read from a checkpoint."""
        for s, t in zip(self.slices, self.shards):
            t.copy_(tensors[s.name].reshape(-1)[s.param_range.start:s.param_range.end])

    @contextlib.contextmanager
    def weights_in_model(self, ddp):
        """The model holds the EMA weights inside the block (rounded to the parameters' dtype); the trained
        weights are back afterwards, bit for bit. Collective over the DP x CP group.

        Each rank writes its EMA slices where megatron writes the master slices after a step (the param
        buffer) and megatron's param all-gather (``start_param_sync``) assembles the parameters; on the way
        out the master slices go back the same way. fp32 parameters are their own master weights, so their
        slices are kept aside meanwhile.
        """
        kept = [s.main.detach().clone() if s.is_param_view else None for s in self.slices]
        self._write_to_param_buffer(self.shards, ddp)
        try:
            yield
        finally:
            with torch.no_grad():
                for s, k in zip(self.slices, kept):
                    if k is not None:
                        s.main.copy_(k)
            self._write_to_param_buffer([s.main for s in self.slices], ddp)

    @torch.no_grad()
    def _write_to_param_buffer(self, values, ddp) -> None:
        for s, v in zip(self.slices, values):
            s.param_buffer_slice().copy_(v)
        device = next(ddp.module.parameters()).device
        with cpu_compat.CudaAsCpu() if device.type == "cpu" else contextlib.nullcontext():
            ddp.start_param_sync(force_sync=True)
