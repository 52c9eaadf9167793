"""megatron-core's DDP, distributed optimizer and LR schedule around a WanDiT, and the EMA of its weights.

- ``DistributedDataParallel``: bucketed gradient reduction over the DP x CP ranks into an fp32 grad
  buffer (``param.main_grad``); averaging divides by dp * cp, and the trainer scales the loss by cp
  because each CP rank's gradient is a partial sum over its tokens (as Megatron's own loss functions do).
- Replicated parameters tagged ``sequence_parallel`` (their gradients are partial sums over this rank's
  SP tokens) are all-reduced over TP after the DP reduction: ``finish_grad_sync``.
- The distributed optimizer (ZeRO-1): fp32 master weights and Adam moments sharded over DP x CP;
  gradient clipping by the true global norm (megatron counts a TP-replicated parameter once).
- ``OptimizerParamScheduler``: linear warmup, then cosine / linear decay to ``min_lr``.
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
        wd_incr_style="constant")
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


class EMA:
    """Exponential moving average of this rank's parameter shards, fp32 (TP attributes kept for checkpoints)."""

    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {}
        for name, p in model.named_parameters():
            t = p.detach().float().clone()
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(p, attr):
                    setattr(t, attr, getattr(p, attr))
            self.shadow[name] = t

    @torch.no_grad()
    def update(self, model) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def named_tensors(self):
        return self.shadow.items()

    @torch.no_grad()
    def load(self, tensors: dict) -> None:
        for name, t in tensors.items():
            self.shadow[name].copy_(t)
