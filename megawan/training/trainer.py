"""The TI2V / world-model flow-matching trainer: one class, one loop, every rank runs the same code.

Per optimizer step: ``grad_accumulation`` micro-batches (noise, sigma and clean frames drawn from a
generator seeded by (seed, step, micro-batch, DP rank): identical on the TP / CP ranks of a replica,
different across replicas, and the same after a resume into any layout); forward + backward through
megatron DDP; the DP x CP reduction and the TP reduction of sequence-parallel grads; a finite check
(a non-finite loss or gradient skips the step, counted; ``max_nonfinite_in_a_row`` stops the run);
the distributed optimizer step (clipped by the global norm), the LR schedule and the EMA.
Checkpoints every ``checkpoint.every`` steps, when the run ends (``run.steps`` reached, or
``run.exit_after_steps`` done in this process), and at the next step boundary after SIGTERM or SIGUSR1
(then the process exits 0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megawan import parallel_state
from megawan.diffusion import (apply_text_dropout, clean_frame_counts, flow_matching_loss, noisy_latents,
                               sample_sigmas, token_timesteps)
from megawan.models.dit import DiTRuntime, WanDiT
from megawan.models.dit_config import WanDiTConfig
from megawan.parallel_state import LayoutError, ParallelLayout
from megawan.training import checkpointing
from megawan.training.budget import GIB, dit_flops, estimate_memory, suggest_layout
from megawan.training.config import TrainConfig, dump_config
from megawan.training.data import Batch, TrainingData, build_dataset, build_vae, latent_shape, validation_clips
from megawan.training.metrics import MetricsLogger, peak_memory_gib
from megawan.training.signals import StopRequest
from megawan.vae.pretrained import record_vae
from megawan.evaluation.pictures import write_training_curves
from megawan.training.optim import EMA, build_optimizer, finish_grad_sync, grads_are_finite, wrap_ddp

logger = logging.getLogger("megawan.train")

class TrainingError(RuntimeError):
    """The run cannot go on (e.g. non-finite losses in a row); the message says why."""


class MemoryBudgetError(RuntimeError):
    """The layout needs more memory per rank than the device (or host) has."""


def model_config(cfg: TrainConfig) -> WanDiTConfig:
    if cfg.model.init:
        base = WanDiTConfig.load(cfg.model.init)
    else:
        base = WanDiTConfig.load(cfg.model.dit)
    return dataclasses.replace(base, state_dim=cfg.model.state_dim) if cfg.model.state_dim else base


def tokens_per_sample(dit: WanDiTConfig, shape) -> int:
    f, h, w = shape
    pt, ph, pw = dit.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def device_capacity_bytes(device: torch.device) -> float:
    """Memory one rank may use: its GPU's, or the host's available memory shared by this node's ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or
                os.environ.get("WORLD_SIZE", "1"))
    return psutil.virtual_memory().available / max(1, local)


def check_memory(cfg: TrainConfig, dit: WanDiTConfig, world: int, device: torch.device) -> None:
    """Refuse a layout whose estimated per-rank memory exceeds the rank's capacity, naming a layout that fits."""
    tokens = tokens_per_sample(dit, latent_shape(cfg.data))
    kw = dict(tokens=tokens, batch=cfg.data.batch_size, compute_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
              residual_bytes=2 if cfg.model.residual_dtype == "bfloat16" else 4,
              ema=cfg.optim.ema_decay > 0, sequence_parallel=cfg.parallel.sequence_parallel)
    recompute = cfg.model.recompute_granularity if cfg.model.activation_checkpointing else None
    est = estimate_memory(dit, tp=cfg.parallel.tp, cp=cfg.parallel.cp, dp=world // (cfg.parallel.tp * cfg.parallel.cp),
                          recompute=recompute, recompute_num_blocks=cfg.model.recompute_num_blocks, **kw)
    capacity = device_capacity_bytes(device)
    if est.total <= capacity:
        logger.info("memory estimate per rank: %s of %.1f GiB", est.describe(), capacity / GIB)
        return
    fit = suggest_layout(dit, world, capacity, **kw)
    hint = (f"a layout that fits: --parallel.tp {fit[0]} --parallel.cp {fit[1]}"
            + (f" --model.activation_checkpointing true --model.recompute_granularity {fit[2]}" if fit[2]
               else "")) if fit else \
        "no layout of these ranks fits: use more ranks, a smaller batch or shorter clips"
    raise MemoryBudgetError(
        f"tp={cfg.parallel.tp} x cp={cfg.parallel.cp} on {world} ranks needs about {est.describe()} per rank "
        f"({tokens} tokens x batch {cfg.data.batch_size}), more than the {capacity / GIB:.1f} GiB this rank has "
        f"({device.type}); {hint}")


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Trainer:
    def __init__(self, cfg: TrainConfig, stop: StopRequest | None = None):
        self.stop = stop or StopRequest().install()  # before the slow start-up: no signal is lost
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        env = parallel_state.launch_env()
        world = dist.get_world_size() if dist.is_initialized() else env["world_size"]
        self.dit_config = model_config(cfg)
        ParallelLayout(world_size=world, tp=cfg.parallel.tp, cp=cfg.parallel.cp).validate(self.dit_config.num_heads)
        self.groups = parallel_state.initialize(cfg.parallel.tp, cfg.parallel.cp, seed=cfg.run.seed)
        self.rank = dist.get_rank()
        check_memory(cfg, self.dit_config, world, self.groups.device)

        dtype = getattr(torch, cfg.model.dtype)
        runtime = DiTRuntime(dtype=dtype, residual_dtype=getattr(torch, cfg.model.residual_dtype),
                             sequence_parallel=cfg.parallel.sequence_parallel,
                             linear_impl=cfg.model.linear_impl, attention_backend=cfg.model.attention_backend,
                             activation_checkpointing=cfg.model.activation_checkpointing,
                             recompute_granularity=cfg.model.recompute_granularity,
                             recompute_num_blocks=cfg.model.recompute_num_blocks,
                             compile_blocks=cfg.model.compile_blocks,
                             fp8=cfg.model.fp8, fp8_bf16_blocks=cfg.model.fp8_bf16_blocks)
        if cfg.model.init:
            self.model = WanDiT.from_pretrained(cfg.model.init, dtype=dtype, groups=self.groups, runtime=runtime,
                                                state_dim=cfg.model.state_dim or None)
        else:
            torch.manual_seed(cfg.run.seed)  # CPU init: the same full weights for every layout
            self.model = WanDiT(self.dit_config, self.groups, runtime)
        self.ddp = wrap_ddp(self.model, self.groups)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, cfg.optim, self.groups, cfg.run.steps)
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

        self.data = TrainingData(cfg.data, self.groups, text_dim=self.dit_config.text_dim,
                                 text_len=self.dit_config.text_len, seed=cfg.run.seed,
                                 with_states=self.dit_config.state_dim > 0)
        self.tokens = tokens_per_sample(self.dit_config, latent_shape(cfg.data))
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._val_cache: list | None = None
        self._rollout_clips: list | None = None

    # ---- one step ------------------------------------------------------------------------------

    def _sample_generator(self, step: int, micro: int, i: int) -> torch.Generator:
        """Sample i of this rank's micro-batch is sample ``i * dp + dp_rank`` of the step's global batch (the
        sampler interleaves DP ranks), so its draws are the same in every layout with the same global batch."""
        index = i * self.groups.dp + self.groups.dp_rank
        return torch.Generator().manual_seed(_derive_seed(self.cfg.run.seed, step, micro, index))

    def draws(self, batch: Batch, step: int, micro: int):
        """(sigma [B], clean frames [B], noise, text after dropout), drawn per sample."""
        obj, parts = self.cfg.objective, []
        for i in range(batch.size):
            gen = self._sample_generator(step, micro, i)
            parts.append((sample_sigmas(1, obj, gen), clean_frame_counts(1, obj, gen),
                          torch.randn(batch.latents.shape[1:], generator=gen)[None],
                          apply_text_dropout(batch.text[i:i + 1], self.data.empty_text, obj.text_dropout, gen)))
        sigma, clean, noise, text = (torch.cat(x) for x in zip(*parts))
        return sigma, clean, noise, text

    def loss(self, batch: Batch, sigma: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor,
             text: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss of one micro-batch for the given draws."""
        x0 = batch.latents
        noise = noise.to(x0.device)
        x_t = noisy_latents(x0, noise, sigma.to(x0.device), clean)
        pt, ph, pw = self.dit_config.patch_size
        grid = (x0.shape[2] // pt, x0.shape[3] // ph, x0.shape[4] // pw)
        t = token_timesteps(sigma, clean, grid).to(x0.device)
        v = self.ddp(x_t, t, text.to(x0.device), states=batch.states)
        return flow_matching_loss(v, x0, noise, clean)

    def train_step(self, micro_batches: list[Batch]) -> dict:
        """One optimizer step over ``micro_batches``; returns its metrics (loss averaged over DP)."""
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        n = len(micro_batches)
        total = torch.zeros((), device=self.groups.device)
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.ddp.no_sync()
            with sync:
                loss = self.loss(batch, *self.draws(batch, self.step, i))
                # CP ranks each hold a partial gradient (their tokens); DDP averages over DP x CP.
                (loss * self.groups.cp / n).backward()
            total += loss.detach() / n
        finish_grad_sync(self.ddp, self.groups)
        loss_sum = total.clone()
        dist.all_reduce(loss_sum, group=self.groups.dp_group)
        mean_loss = loss_sum.item() / self.groups.dp
        finite = math.isfinite(mean_loss) and grads_are_finite(self.ddp)
        metrics = {"loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"]}
        if not finite:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            metrics.update(skipped_nonfinite=1, nonfinite_total=self.nonfinite_total, grad_norm=float("nan"))
            if self.nonfinite_in_a_row >= self.cfg.optim.max_nonfinite_in_a_row:
                raise TrainingError(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                                    f"(last at step {self.step}, loss {mean_loss}): stopping; lower optim.lr or "
                                    f"check the data (skipped so far: {self.nonfinite_total})")
            logger.warning("step %d: non-finite loss or gradient (loss %s): step skipped", self.step, mean_loss)
            return metrics
        self.nonfinite_in_a_row = 0
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(1)
        if self.ema is not None:
            self.ema.update(self.model)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else None,
                       nonfinite_total=self.nonfinite_total)
        return metrics

    # ---- validation -----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss at fixed sigmas on fixed held-out clips with fixed noise (the same every time)."""
        vcfg = self.cfg.validation
        if self._val_cache is None:
            dataset = build_dataset(self.cfg.data, vcfg.root) if vcfg.root else self.data.dataset
            items = validation_clips(len(dataset), vcfg.num_clips)
            self._val_cache = []
            for item in items:
                raw = dataset[item]
                raw = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in raw.items() if k != "skipped"}
                self._val_cache.append((item, self.data.to_batch(raw)))  # every rank: the VAE call is collective
        self.model.eval()
        sums = torch.zeros(len(vcfg.sigmas), device=self.groups.device)
        count = 0
        for k, (item, batch) in enumerate(self._val_cache):
            if k % self.groups.dp != self.groups.dp_rank:
                continue
            clean = torch.full((batch.size,), self.cfg.objective.clean_frames, dtype=torch.int64)
            for j, s in enumerate(vcfg.sigmas):
                gen = torch.Generator().manual_seed(_derive_seed(vcfg.seed, item, j))
                noise = torch.randn(batch.latents.shape, generator=gen)
                sums[j] += self.loss(batch, torch.full((batch.size,), float(s)), clean, noise, batch.text)
            count += 1
        counts = torch.tensor([float(count)], device=sums.device)
        dist.all_reduce(sums, group=self.groups.dp_group)
        dist.all_reduce(counts, group=self.groups.dp_group)
        per_sigma = (sums / counts.clamp_min(1)).tolist()
        out = {f"loss_sigma_{s:g}": v for s, v in zip(vcfg.sigmas, per_sigma)}
        out["loss"] = sum(per_sigma) / len(per_sigma)
        self.model.train()
        return out

    @torch.no_grad()
    def rollouts(self) -> dict:
        """World-model rollouts on fixed held-out clips, scored like the 1X challenge (PSNR / SSIM of the
        predicted frames against the truth and the copy-last-context-frame baseline)."""
        from megawan.evaluation.rollouts import evaluate_rollouts, write_rollout_sheet
        from megawan.pipelines.sampling import SamplingConfig

        vcfg, data_cfg = self.cfg.validation, self.cfg.data
        if self._rollout_clips is None:  # raw clips (video + states) of the held-out split, read once
            dataset = build_dataset(dataclasses.replace(data_cfg, source="1x"), vcfg.root or data_cfg.root)
            self._rollout_clips = [dataset[i] for i in validation_clips(len(dataset), vcfg.rollout_clips)]
        vae = self.data.vae if self.data.vae is not None else build_vae(data_cfg, self.groups.device)
        context = 4 * (self.cfg.objective.clean_frames - 1) + 1  # K clean latent frames <- 4 (K - 1) + 1 frames
        result = evaluate_rollouts(self.model, vae, self._rollout_clips, self.groups, text=self.data.empty_text,
                                   config=SamplingConfig(steps=vcfg.rollout_steps, guidance=1.0),
                                   context_frames=context, seed=vcfg.seed,
                                   conditions=[c for c in vcfg.rollout_conditions if c != "swapped" or
                                               len(self._rollout_clips) > 1] if self.dit_config.state_dim else ["true"])
        if self.rank == 0:
            write_rollout_sheet(result, self.out_dir / "rollouts" / f"step_{self.step:08d}.png")
        return result

    # ---- checkpoints ----------------------------------------------------------------------------

    def _common_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(),
                "nonfinite_total": self.nonfinite_total, "model_config": dataclasses.asdict(self.dit_config),
                "config": self.cfg.to_dict()}

    def save(self) -> Path:
        path = checkpointing.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.groups,
                                             ema=self.ema, common=self._common_state(),
                                             keep=self.cfg.checkpoint.keep)
        logger.info("checkpoint %s written", path)
        return path

    def resume(self) -> Path | None:
        path = Path(self.cfg.checkpoint.load) if self.cfg.checkpoint.load else \
            checkpointing.find_resume_point(self.ckpt_dir)
        if path is None:
            return None
        if not (path / checkpointing.MARKER).exists():
            raise FileNotFoundError(f"checkpoint.load={path} is not a complete megawan checkpoint "
                                    f"(no {checkpointing.MARKER})")
        common = checkpointing.load_checkpoint(path, self.model, self.optimizer, self.groups, ema=self.ema)
        saved = WanDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in common["model_config"].items()})
        if saved != self.dit_config:
            raise ValueError(f"checkpoint {path} holds a different model ({saved}) than this config "
                             f"({self.dit_config})")
        self.step = int(common["step"])
        self.scheduler.load_state_dict(common["scheduler"])
        self.data.load_state_dict(common["data"])
        self.nonfinite_total = int(common.get("nonfinite_total", 0))
        return path

    # ---- signals --------------------------------------------------------------------------------

    def _agree_to_stop(self) -> bool:
        """True on every rank when any rank got a stop signal (signals may reach only some ranks)."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0], device=self.groups.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    # ---- the loop -------------------------------------------------------------------------------

    def _step_metrics(self, metrics: dict, seconds: float, samples: int) -> dict:
        world = dist.get_world_size()
        flops = dit_flops(self.dit_config, self.tokens, batch=samples)
        tflops = flops / seconds / world / 1e12
        return {**metrics, "step_time_s": seconds, "samples_per_s": samples / seconds,
                "tokens_per_s": samples * self.tokens / seconds, "tflops_per_device": tflops,
                "mfu": tflops / self.cfg.logging.peak_tflops, "memory_gib": peak_memory_gib(self.groups.device)}

    def fit(self) -> dict:
        cfg = self.cfg
        resumed = self.resume()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "resolved_config.yaml").write_text(dump_config(cfg))
            record_vae(cfg.data.vae, self.out_dir, self.data.vae)  # the run folder alone samples and evaluates
            checkpointing.remove_torn(self.ckpt_dir)
        dist.barrier()
        log = MetricsLogger(self.out_dir / "logs", enabled=self.rank == 0, total_steps=cfg.run.steps,
                            start_step=self.step, every=cfg.logging.every, tensorboard=cfg.logging.tensorboard,
                            progress_bar=cfg.logging.progress_bar)
        log.message(f"megawan train: tp={self.groups.tp} cp={self.groups.cp} dp={self.groups.dp} "
                    f"(sequence parallel {self.model.sequence_parallel}), {self.tokens} tokens/sample, "
                    f"dtype {cfg.model.dtype}, residual stream {cfg.model.residual_dtype}, fp8 {cfg.model.fp8}, "
                    f"compiled blocks {self.model.backend.compile_blocks}, steps {self.step} -> {cfg.run.steps}"
                    + (f", resumed from {resumed}" if resumed else ""))
        batches = self.data.batches()
        preempted = False
        last: dict = {}
        first_step = self.step
        try:
            while self.step < cfg.run.steps:
                if self._agree_to_stop():
                    preempted = True
                    break
                if cfg.run.exit_after_steps and self.step - first_step >= cfg.run.exit_after_steps:
                    break
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.optim.grad_accumulation)]
                metrics = self.train_step(micro)
                self.step += 1
                seconds = time.perf_counter() - t0
                last = self._step_metrics(metrics, seconds, sum(b.size for b in micro) * self.groups.dp)
                last["skipped_inputs"] = sum(self.data.skip_counts.values())
                log.log(self.step, last)
                if cfg.validation.every and self.step % cfg.validation.every == 0:
                    log.log(self.step, self.validate(), kind="validation")
                if cfg.validation.rollout_every and self.step % cfg.validation.rollout_every == 0:
                    log.log_rollouts(self.step, self.rollouts())
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.steps:
                    self.save()
            # a rerun of a finished run does nothing: its newest checkpoint stays the answer
            path = self.save() if self.step > first_step or resumed is None else resumed
        finally:
            self.stop.restore()
            log.close()
        curves = write_training_curves(self.out_dir, cfg.run.name) if self.rank == 0 else None
        if preempted and self.rank == 0:
            print(f"preempted: checkpoint {path} written at step {self.step}; rerun the same command to resume",
                  flush=True)
        return {"step": self.step, "checkpoint": str(path) if path else None, "preempted": preempted,
                "curves": curves, **last}
