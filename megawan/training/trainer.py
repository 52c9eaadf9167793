"""The TI2V / world-model flow-matching trainer: one class, one loop, every rank runs the same code.

Per optimizer step: ``grad_accumulation`` micro-batches (noise, sigma and clean frames drawn per sample from
a generator seeded by (seed, step, the sample's position in the step's global batch): identical on the TP /
CP ranks of a replica, different across samples, and the same for every split of the global batch into
batch x accumulation x DP and after a resume into any layout); forward + backward through
megatron DDP; the DP x CP reduction and the TP reduction of sequence-parallel grads; a finite check
(a non-finite loss or gradient skips the step, counted; ``max_nonfinite_in_a_row`` stops the run);
the distributed optimizer step (clipped by the global norm), the LR schedule and the EMA.
Checkpoints every ``checkpoint.every`` steps, when the run ends (``run.steps`` reached, or
``run.exit_after_steps`` done in this process), and at the next step boundary after SIGTERM, SIGUSR1, a first
Ctrl-C or the SLURM batch shell's stop file (then the process exits 0). A step's checkpoint is written before
that step's validation and rollouts, and an evaluation that fails is logged and skipped, never fatal.

Restarts: rank 0 takes the run folder's lock (a second run in the folder refuses at once), chooses the
checkpoint to resume (the run's newest readable one; ``checkpoint.load`` only while the run has none) and
broadcasts the choice; the first lines of the log say which and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
from megawan.parallel_state import ParallelLayout
from megawan.progress import ProgressLine
from megawan.training import checkpointing
from megawan.training.bad_input_log import RunBadInputs
from megawan.training.budget import dit_flops
from megawan.training.preflight import (MemoryBudgetError, memory_check, memory_reserve,  # noqa: F401 (re-exported)
                                        model_config, tokens_per_sample)
from megawan.training.config import (TrainConfig, check_resume_changes, config_changes, describe_changes,
                                     dump_config, evaluated_weights)
from megawan.training.data import (Batch, TrainingData, build_dataset, build_vae, latent_shape,
                                   validation_clips)
from megawan.training.metrics import MetricsLogger, peak_memory_gib
from megawan.training.run_lock import RunFolderLocked, RunLock
from megawan.training.signals import StopRequest
from megawan.training.optim import (ShardedEMA, apply_optimizer_config, build_optimizer, finish_grad_sync,
                                    grads_are_finite, wrap_ddp)
from megawan.vae.pretrained import record_vae, vae_source
from megawan.evaluation.pictures import write_training_curves

logger = logging.getLogger("megawan.train")

class TrainingError(RuntimeError):
    """The run cannot go on (e.g. non-finite losses in a row); the message says why."""


class _ReadFailed(RuntimeError):
    """A read of evaluation data failed on some rank; raised on every rank alike (the message names them)."""


def _describe_failures(failed: list[tuple[int, str]]) -> str:
    (rank, error), more = failed[0], len(failed) - 1
    return f"{error} (rank {rank}" + (f" and {more} more" if more else "") + ")"


class EvaluationDataError(ValueError):
    """Validation or rollouts are switched on but their data cannot be used; found at start, not at step N."""


def rollout_root(cfg: TrainConfig) -> tuple[str, str]:
    """(the raw 1X split the rollouts read, why that one). Rollouts need videos and states: a latent cache as
    ``validation.root`` (the 5B presets' set-up) leads to the raw split it was made from (its cache_config.json)."""
    key = "validation.root" if cfg.validation.root else "data.root"
    root = Path(cfg.validation.root or cfg.data.root)
    if not (root / "index.json").is_file():
        return str(root), key
    made_from = {}
    if (root / "cache_config.json").is_file():
        made_from = json.loads((root / "cache_config.json").read_text())
    raw = made_from.get("data") if made_from.get("source") == "1x" else None
    if raw and Path(raw).is_dir():
        return raw, f"the raw 1X split that {key}={root} (a latent cache) was made from"
    where = f" made from {raw}, which is not there" if raw else ""
    raise EvaluationDataError(f"validation.rollout_every needs raw 1X clips (videos and states), but {key}={root} "
                              f"is a latent cache{where}: point validation.root at a raw 1X split (e.g. val_v2.0_raw) "
                              f"or set validation.rollout_every 0")


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
    """Refuse a layout whose estimated per-rank memory exceeds the rank's capacity, naming a layout that fits
    (``preflight.memory_check``: the planner's figures)."""
    check = memory_check(cfg, dit, world, device.type, device_capacity_bytes(device))
    if not check.fits:
        raise MemoryBudgetError(check.refusal())
    logger.info("%s", check.summary())


def _eval_kind(kind: str, weights: str) -> str:
    return kind if weights == "raw" else f"{kind}_{weights}"


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Trainer:
    def __init__(self, cfg: TrainConfig, stop: StopRequest | None = None):
        # before the slow start-up: no signal is lost. One given by the caller (megawan.train.main) stays
        # installed after fit: a second Ctrl-C while the process winds down must still stop it in one line
        self._owns_stop = stop is None
        self.stop = stop or StopRequest().install()
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        env = parallel_state.launch_env()
        world = dist.get_world_size() if dist.is_initialized() else env["world_size"]
        self.dit_config = model_config(cfg)
        par = cfg.parallel
        ParallelLayout(world_size=world, tp=par.tp, cp=par.cp, cp_impl=par.cp_impl,
                       ulysses_size=par.ulysses_size).validate(self.dit_config.num_heads)
        self.groups = parallel_state.initialize(par.tp, par.cp, cp_impl=par.cp_impl, ulysses_size=par.ulysses_size,
                                                seed=cfg.run.seed)
        self.rank = dist.get_rank()
        self._lock = RunLock(self.out_dir)
        self._on_rank0(self._lock.acquire)  # before anything reads or writes the folder: refused at once
        self.stop.on_abort(self._lock.release)
        try:
            self.resume_choice = self._on_rank0(self._choose_resume_point)
            self._build(cfg, world)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg: TrainConfig, world: int) -> None:
        par = cfg.parallel
        check_memory(cfg, self.dit_config, world, self.groups.device)

        dtype = getattr(torch, cfg.model.dtype)
        runtime = DiTRuntime(dtype=dtype, residual_dtype=getattr(torch, cfg.model.residual_dtype),
                             sequence_parallel=cfg.parallel.sequence_parallel,
                             linear_impl=cfg.model.linear_impl, attention_backend=cfg.model.attention_backend,
                             activation_checkpointing=cfg.model.activation_checkpointing,
                             recompute_granularity=cfg.model.recompute_granularity,
                             recompute_num_blocks=cfg.model.recompute_num_blocks,
                             compile_blocks=cfg.model.compile_blocks,
                             fp8=cfg.model.fp8, fp8_bf16_blocks=cfg.model.fp8_bf16_blocks,
                             cp_impl=par.cp_impl, ulysses_size=par.ulysses_size)
        if cfg.model.init:
            self.model = WanDiT.from_pretrained(cfg.model.init, dtype=dtype, groups=self.groups, runtime=runtime,
                                                state_dim=cfg.model.state_dim or None)
        else:
            torch.manual_seed(cfg.run.seed)  # CPU init: the same full weights for every layout
            self.model = WanDiT(self.dit_config, self.groups, runtime)
        self.ddp = wrap_ddp(self.model, self.groups)
        self.optimizer, self.scheduler = build_optimizer(self.ddp, cfg.optim, self.groups, cfg.run.steps)
        self.ema = ShardedEMA(self.optimizer, self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None

        self.data = TrainingData(cfg.data, self.groups, text_dim=self.dit_config.text_dim,
                                 text_len=self.dit_config.text_len, seed=cfg.run.seed,
                                 with_states=self.dit_config.state_dim > 0)
        self.tokens = tokens_per_sample(self.dit_config, latent_shape(cfg.data))
        self.step = 0
        self.resume_changes: list = []
        self.resume_note: str | None = None
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._val_cache: list | None = None
        self._val_dataset = None
        self._rollout_clips: list | None = None
        self._rollout_vae = None
        self._open_evaluation_data()
        self.bad_inputs = RunBadInputs(self.groups, shared=self.data.report.tally, loader=self.data.loader.tally)

    # ---- rank 0 decides, every rank follows -----------------------------------------------------

    def _on_rank0(self, fn):
        """``fn()`` on rank 0; every rank returns its result, or raises its error (a refusal, a bad path)."""
        payload: list = [None]
        error = None
        if self.rank == 0:
            try:
                payload[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                error = e
                known = isinstance(e, (RunFolderLocked, FileNotFoundError, ValueError))
                payload[0] = ("error", e if known else RuntimeError(f"rank 0: {type(e).__name__}: {e}"))
        dist.broadcast_object_list(payload, src=0, device=self.groups.device)
        status, value = payload[0]
        if status == "error":
            raise error if error is not None else value
        return value

    def close(self) -> None:
        """Release the run folder (``fit`` does it when it ends; call it for a Trainer that never fits)."""
        if self.rank == 0:
            self._lock.release()

    def _choose_resume_point(self) -> checkpointing.ResumeChoice:
        choice = checkpointing.choose_resume_point(self.ckpt_dir, self.cfg.checkpoint.load)
        for line in choice.warnings:
            logger.warning(line)
        logger.info("resume: %s (%s)", choice.path or "none", choice.reason)
        return choice

    # ---- one step ------------------------------------------------------------------------------

    def global_position(self, micro: int, i: int) -> int:
        """Where sample i of this rank's micro-batch ``micro`` sits in the step's global batch.

        The sampler interleaves DP ranks (rank r reads stream positions r, r + dp, ...), and this rank's
        micro-batches of ``data.batch_size`` follow one another in its share, so its j-th sample of the step
        (j = micro * batch_size + i) is global sample ``j * dp + dp_rank``. Every split of one global batch
        (batch b x accumulation a x DP d) puts the same clip at the same position, so keying the draws by
        (seed, step, position) makes the step independent of the split.
        """
        return (micro * self.cfg.data.batch_size + i) * self.groups.dp + self.groups.dp_rank

    def _sample_generator(self, step: int, position: int) -> torch.Generator:
        return torch.Generator().manual_seed(_derive_seed(self.cfg.run.seed, step, position))

    def draws(self, batch: Batch, step: int, micro: int):
        """(sigma [B], clean frames [B], noise, text after dropout), drawn per sample from its global position."""
        obj, parts = self.cfg.objective, []
        for i in range(batch.size):
            gen = self._sample_generator(step, self.global_position(micro, i))
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
        # the mean of per-sample means: every sample weighs the same whichever micro-batch or DP rank it is
        # on (a pooled mean would weigh samples by their scored frames, which differ with the T2V share)
        return flow_matching_loss(v, x0, noise, clean, reduction="none").mean()

    def train_step(self, micro_batches: list[Batch]) -> dict:
        """One optimizer step over ``micro_batches``; returns its metrics (loss averaged over DP)."""
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        n = len(micro_batches)
        total = torch.zeros((), device=self.groups.device)
        samples = sum(b.size for b in micro_batches)
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext() if i == n - 1 else self.ddp.no_sync()
            with sync:
                # weighted by its share of this rank's samples: the step's loss is the mean over samples
                # whichever way the global batch is split (a short last batch of an epoch included)
                share = batch.size / samples
                loss = self.loss(batch, *self.draws(batch, self.step, i))
                # CP ranks each hold a partial gradient (their tokens); DDP averages over DP x CP.
                (loss * self.groups.cp * share).backward()
            total += loss.detach() * share
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
            self.ema.update()  # from the fp32 master slices the step just wrote
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else None,
                       nonfinite_total=self.nonfinite_total)
        return metrics

    # ---- validation -----------------------------------------------------------------------------

    def _open_evaluation_data(self) -> None:
        """Open what validation and rollouts read, now rather than at their first step: a wrong folder, a cache
        where raw clips are needed, or a clip that cannot be read fails the start with one line."""
        vcfg, data_cfg = self.cfg.validation, self.cfg.data
        if vcfg.every:
            key = "validation.root" if vcfg.root else "data.root"
            try:
                self._val_dataset = build_dataset(data_cfg, vcfg.root, self.data.report) if vcfg.root else \
                    self.data.dataset
                if len(self._val_dataset) == 0:
                    raise ValueError("it holds no clips")
                self._evaluation_read(self._val_dataset, validation_clips(len(self._val_dataset), vcfg.num_clips)[0])
            except Exception as e:  # noqa: BLE001 - any failure to read it is a bad validation source
                raise EvaluationDataError(f"validation.every={vcfg.every}: {key}={vcfg.root or data_cfg.root} "
                                          f"cannot be read for validation ({type(e).__name__}: {e})") from e
        if vcfg.rollout_every:
            root, why = rollout_root(self.cfg)
            try:
                dataset = build_dataset(dataclasses.replace(data_cfg, source="1x"), root, self.data.report)
                # raw clips (video + states) of the held-out split, read once and kept
                self._rollout_clips = [self._evaluation_read(dataset, i)
                                       for i in validation_clips(len(dataset), vcfg.rollout_clips)]
                if not self._rollout_clips:
                    raise ValueError("it holds no clips")
            except Exception as e:  # noqa: BLE001
                raise EvaluationDataError(f"validation.rollout_every={vcfg.rollout_every}: the rollouts' clips "
                                          f"({why}: {root}) cannot be read ({type(e).__name__}: {e})") from e
            if self.data.vae is None:
                try:  # a preset, a fitted VAE of the package, or a path that must exist
                    vae_source(data_cfg.vae)
                except FileNotFoundError as e:
                    raise EvaluationDataError(f"validation.rollout_every={vcfg.rollout_every}: the rollouts encode "
                                              f"and decode with data.vae={data_cfg.vae}, which does not exist "
                                              f"({e})") from e
            logger.info("rollouts: %d clip(s) from %s (%s)", len(self._rollout_clips), root, why)

    def _evaluation_read(self, dataset, item: int) -> dict:
        """``dataset[item]`` for validation or rollouts; what it skipped goes to the run's shared tally (every
        rank reads the same items, so rank 0 counts them for the job)."""
        sample = dataset[item]
        for notice in sample.get("skipped", ()):
            self.data.report.tally.add(notice)
        return sample

    def _failures(self, error: str | None) -> list[tuple[int, str]]:
        """Collective: (rank, error) of every rank whose ``error`` is not None."""
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return [(r, e) for r, e in enumerate(errors) if e is not None]

    def _read_on_every_rank(self, read):
        """``read()`` (no collective inside: a file, a decode, a load) on every rank, then agree: if it failed on
        any rank, every rank raises the same _ReadFailed here, so none is left waiting in the collective that
        would come next (the evaluation then fails as a whole and training goes on)."""
        try:
            value, error = read(), None
        except Exception as e:  # noqa: BLE001
            value, error = None, f"{type(e).__name__}: {e}"
        failed = self._failures(error)
        if failed:
            raise _ReadFailed(_describe_failures(failed))
        return value

    def _evaluate(self, kind: str, run, log) -> None:
        """Run one evaluation (``run()`` -> result, ``log(result)``); a failure is logged on rank 0 and recorded
        in metrics.jsonl (``kind: {kind}_error``), and training goes on.

        Every read inside an evaluation is agreed on by all ranks (``_read_on_every_rank``), so a bad clip or
        file on one rank makes all ranks skip together. A failure inside the evaluation's collectives on one
        rank only (e.g. out of memory on one GPU) cannot be survived this way: the others would wait in the
        collective until the process group's timeout ends the job (the step's checkpoint is already written).
        """
        try:
            result, error = run(), None
        except _ReadFailed as e:
            result, error = None, f"agreed:{e}"
        except Exception as e:  # noqa: BLE001 - an evaluation must never end the run
            result, error = None, f"{type(e).__name__}: {e}"
        failed = self._failures(error)
        if not failed:
            log(result)
            return
        self.model.train()
        if kind.startswith("validation"):
            self._val_cache = None  # read again next time
        agreed = [e[len("agreed:"):] for _, e in failed if e.startswith("agreed:")]
        message = agreed[0] if agreed else _describe_failures(failed)
        if self.rank == 0:
            logger.warning("step %d: %s failed: %s; training goes on", self.step, kind, message)
        self._log.log(self.step, {"error": message}, kind=f"{kind}_error")

    def _task_progress(self, total: int, desc: str, unit: str) -> ProgressLine:
        """Progress of a validation or rollout task, shown as the training loop's is (rank 0; none outside fit)."""
        log = getattr(self, "_log", None)
        if log is None:
            return ProgressLine(total, desc=desc, unit=unit, enabled=False)
        return log.task_progress(total, desc, unit)

    @contextlib.contextmanager
    def weights(self, which: str):
        """The model holds the trained weights ("raw") or the EMA's ("ema") inside the block (collective)."""
        if which == "raw":
            yield
            return
        if self.ema is None:
            raise ValueError("EMA weights asked for, but the run has no EMA (optim.ema_decay 0)")
        with self.ema.weights_in_model(self.ddp):
            yield

    @torch.no_grad()
    def validate(self, weights: str = "raw") -> dict:
        """Loss at fixed sigmas on fixed held-out clips (``validation.root``) with fixed noise (the same every
        time), of the trained weights or (``weights="ema"``) of the EMA."""
        vcfg = self.cfg.validation
        if not vcfg.root:
            raise ValueError("validation needs validation.root, a held-out split (the training clips are not)")
        if self._val_cache is None:
            dataset = self._val_dataset if self._val_dataset is not None else \
                build_dataset(self.cfg.data, vcfg.root, self.data.report)
            items = validation_clips(len(dataset), vcfg.num_clips)
            self._val_cache = []
            with self._task_progress(len(items), "validation clips (read and encoded once)", "clip") as progress:
                for item in items:
                    raw = self._read_on_every_rank(lambda: self._evaluation_read(dataset, item))
                    raw = {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in raw.items() if k != "skipped"}
                    self._val_cache.append((item, self.data.to_batch(raw)))  # every rank: the VAE call is collective
                    progress.update(len(self._val_cache))
        with self.weights(weights):
            self.model.eval()
            try:
                out = self._validation_losses(_eval_kind("validation", weights))
            finally:
                self.model.train()
        return out

    def _validation_losses(self, kind: str) -> dict:
        vcfg = self.cfg.validation
        sums = torch.zeros(len(vcfg.sigmas), device=self.groups.device)
        count = 0
        mine = [(item, batch) for k, (item, batch) in enumerate(self._val_cache)
                if k % self.groups.dp == self.groups.dp_rank]
        with self._task_progress(len(mine), f"step {self.step} {kind}", "clip") as progress:
            for item, batch in mine:
                clean = torch.full((batch.size,), self.cfg.objective.clean_frames, dtype=torch.int64)
                for j, s in enumerate(vcfg.sigmas):
                    gen = torch.Generator().manual_seed(_derive_seed(vcfg.seed, item, j))
                    noise = torch.randn(batch.latents.shape, generator=gen)
                    sums[j] += self.loss(batch, torch.full((batch.size,), float(s)), clean, noise, batch.text)
                count += 1
                progress.update(count)
        counts = torch.tensor([float(count)], device=sums.device)
        dist.all_reduce(sums, group=self.groups.dp_group)
        dist.all_reduce(counts, group=self.groups.dp_group)
        per_sigma = (sums / counts.clamp_min(1)).tolist()
        out = {f"loss_sigma_{s:g}": v for s, v in zip(vcfg.sigmas, per_sigma)}
        out["loss"] = sum(per_sigma) / len(per_sigma)
        return out

    def rollout_context_frames(self) -> int:
        """Video frames the rollouts condition on: the K clean latent frames of training <- 4 (K - 1) + 1."""
        return 4 * (self.cfg.objective.clean_frames - 1) + 1

    @torch.no_grad()
    def rollouts(self, weights: str = "raw") -> dict:
        """World-model rollouts on fixed held-out clips, scored like the 1X challenge (PSNR / SSIM of the
        predicted frames against the truth and the copy-last-context-frame baseline), of the trained weights
        or (``weights="ema"``) of the EMA."""
        from megawan.evaluation.rollouts import evaluate_rollouts, write_rollout_sheet
        from megawan.pipelines.sampling import SamplingConfig

        vcfg, data_cfg = self.cfg.validation, self.cfg.data
        if not vcfg.root:
            raise ValueError("rollouts need validation.root, a held-out 1X split (the training clips are not)")
        if self._rollout_clips is None:  # raw clips (video + states) of the held-out split, read once
            def read():
                dataset = build_dataset(dataclasses.replace(data_cfg, source="1x"), rollout_root(self.cfg)[0],
                                        self.data.report)
                return [self._evaluation_read(dataset, i) for i in validation_clips(len(dataset), vcfg.rollout_clips)]

            self._rollout_clips = self._read_on_every_rank(read)
        if self._rollout_vae is None:  # the training data's VAE, or (latent cache) one loaded once and kept
            self._rollout_vae = self.data.vae if self.data.vae is not None else \
                self._read_on_every_rank(lambda: build_vae(data_cfg, self.groups.device))
        conditions = [c for c in vcfg.rollout_conditions if c != "swapped" or len(self._rollout_clips) > 1] \
            if self.dit_config.state_dim else ["true"]
        with self.weights(weights):
            result = evaluate_rollouts(self.model, self._rollout_vae, self._rollout_clips, self.groups,
                                       text=self.data.empty_text,
                                       config=SamplingConfig(steps=vcfg.rollout_steps, guidance=1.0),
                                       context_frames=self.rollout_context_frames(), seed=vcfg.seed,
                                       conditions=conditions,
                                       progress=lambda total: self._task_progress(
                                           total, f"step {self.step} {_eval_kind('rollout', weights)}", "rollout"))
        if self.rank == 0:
            suffix = "" if weights == "raw" else f"_{weights}"
            write_rollout_sheet(result, self.out_dir / "rollouts" / f"step_{self.step:08d}{suffix}.png")
        return result

    # ---- checkpoints ----------------------------------------------------------------------------

    def _common_state(self) -> dict:
        # both non-finite counters: a resume must not forget that the last steps were already non-finite
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(),
                "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "model_config": dataclasses.asdict(self.dit_config), "config": self.cfg.to_dict()}

    def save(self) -> Path:
        path = checkpointing.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.groups,
                                             ema=self.ema, common=self._common_state(),
                                             keep=self.cfg.checkpoint.keep)
        logger.info("checkpoint %s written", path)
        return path

    def resume(self) -> Path | None:
        """Load the checkpoint rank 0 chose at start (``self.resume_choice``, the same on every rank)."""
        if self.resume_choice.path is None:
            return None
        path = Path(self.resume_choice.path)
        # what changed since the checkpoint is checked before any tensor is read: refused changes fail fast
        saved_common = checkpointing.read_common(path)
        changes = config_changes(saved_common.get("config", {}), self.cfg)
        check_resume_changes(changes, int(saved_common["step"]), self.cfg, path)
        had_ema = checkpointing.has_ema(path)
        common = checkpointing.load_checkpoint(path, self.model, self.optimizer, self.groups, ema=self.ema)
        saved = WanDiTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in common["model_config"].items()})
        if saved != self.dit_config:
            raise ValueError(f"checkpoint {path} holds a different model ({saved}) than this config "
                             f"({self.dit_config})")
        self.step = int(common["step"])
        apply_optimizer_config(self.optimizer, self.cfg.optim)  # the checkpoint's param groups held its values
        self.scheduler.load_state_dict(common["scheduler"])  # only the step count: this config's schedule
        self.data.load_state_dict(common["data"])
        self.nonfinite_total = int(common.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(common.get("nonfinite_in_a_row", 0))  # 0 in checkpoints of older megawan
        self.resume_changes = changes
        self.resume_note = self._resume_note(path, changes, had_ema)
        logger.info("%s", self.resume_note.replace("\n", "; "))
        return path

    def schedule_in_force(self) -> str:
        o = self.cfg.optim
        warm = f"warmup {o.warmup_steps} steps to lr {o.lr:g}, then " if o.warmup_steps else f"lr {o.lr:g}, "
        decay = "constant" if o.decay_style == "constant" else f"{o.decay_style} decay to {o.min_lr:g} at step {self.cfg.run.steps}"
        return (f"{warm}{decay}; lr now {self.optimizer.param_groups[0]['lr']:.4g} "
                f"(schedule step {self.scheduler.num_steps})")

    def _resume_note(self, path, changes, had_ema: bool) -> str:
        lines = [f"resumed from {path} at step {self.step}",
                 ("changed since that checkpoint (the new values are in force): " + describe_changes(changes))
                 if changes else "config unchanged since that checkpoint",
                 f"learning rate in force: {self.schedule_in_force()}"]
        decay = self.cfg.optim.ema_decay
        if self.ema is not None:
            lines.append(f"EMA (decay {decay:g}) continued from the checkpoint" if had_ema else
                         f"EMA (decay {decay:g}) started at step {self.step} from the master weights "
                         f"(the checkpoint has none)")
        elif had_ema:
            lines.append("the checkpoint's EMA is not used (optim.ema_decay 0): it is not in the next checkpoint")
        return "\n".join(lines)

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
        try:
            return self._fit(cfg)
        finally:
            if self._owns_stop:
                self.stop.restore()
            self.close()

    def _fit(self, cfg: TrainConfig) -> dict:
        resumed = self.resume()
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # the config in force; after a resume, a header names the checkpoint and what changed since
            (self.out_dir / "resolved_config.yaml").write_text(dump_config(cfg, header=self.resume_note))
            record_vae(cfg.data.vae, self.out_dir, self.data.vae)  # the run folder alone samples and evaluates
            checkpointing.remove_torn(self.ckpt_dir)
        dist.barrier()
        # metrics.jsonl / TensorBoard drop what came after this step: the steps about to be redone
        log = self._log = MetricsLogger(
            self.out_dir / "logs", enabled=self.rank == 0, total_steps=cfg.run.steps, start_step=self.step,
            every=cfg.logging.every, tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
            progress_every_s=cfg.logging.progress_every_s)
        log.message(f"megawan train: tp={self.groups.tp} cp={self.groups.cp} ({cfg.parallel.cp_impl}) "
                    f"dp={self.groups.dp} "
                    f"(sequence parallel {self.model.sequence_parallel}), {self.tokens} tokens/sample, "
                    f"dtype {cfg.model.dtype}, residual stream {cfg.model.residual_dtype}, fp8 {cfg.model.fp8}, "
                    f"compiled blocks {self.model.backend.compile_blocks}, steps {self.step} -> {cfg.run.steps}, "
                    + (f"resumed from {resumed}" if resumed else "from step 0")
                    + f" ({self.resume_choice.reason})")
        if self.resume_note:
            for line in self.resume_note.splitlines()[1:]:
                log.message(line)
        if cfg.validation.every or cfg.validation.rollout_every:
            log.message(f"validation: held-out clips of {cfg.validation.root} (never the training data), scoring "
                        f"the {' and '.join('EMA' if w == 'ema' else 'trained' for w in evaluated_weights(cfg))} "
                        f"weights")
        for line in self.bad_inputs.lines(self.step, at_start=True):  # the construction checks, named once
            log.message(line)
        batches = self.data.batches()
        preempted = stopped_early = False
        last: dict = {}
        first_step = self.step
        path, saved_at = resumed, None
        try:
            while self.step < cfg.run.steps:
                if self._agree_to_stop():
                    preempted = True
                    break
                if cfg.run.exit_after_steps and self.step - first_step >= cfg.run.exit_after_steps:
                    stopped_early = True  # before run.steps: the caller says so (megawan/train.py)
                    break
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.optim.grad_accumulation)]
                metrics = self.train_step(micro)
                self.step += 1
                seconds = time.perf_counter() - t0
                last = self._step_metrics(metrics, seconds, sum(b.size for b in micro) * self.groups.dp)
                last["skipped_inputs"] = sum(self.data.skip_counts.values())
                log.log(self.step, last)
                if self.step % max(1, cfg.logging.every) == 0:  # collective: every rank is at this step
                    for line in self.bad_inputs.lines(self.step):
                        log.message(line)
                # the step's checkpoint first: what follows (validation, rollouts) may take long or fail
                final = self.step >= cfg.run.steps or (
                    cfg.run.exit_after_steps and self.step - first_step >= cfg.run.exit_after_steps)
                if final or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    path, saved_at = self.save(), self.step
                # each evaluation names the weights it scored: kind "validation" / "rollout" for the trained
                # weights, "validation_ema" / "rollout_ema" for the EMA's (validation.weights)
                if cfg.validation.every and self.step % cfg.validation.every == 0:
                    for which in evaluated_weights(cfg):
                        kind = _eval_kind("validation", which)
                        self._evaluate(kind, lambda: self.validate(which),
                                       lambda result: log.log(self.step, result, kind=kind))
                if cfg.validation.rollout_every and self.step % cfg.validation.rollout_every == 0:
                    for which in evaluated_weights(cfg):
                        kind = _eval_kind("rollout", which)
                        self._evaluate(kind, lambda: self.rollouts(which),
                                       lambda result: log.log_rollouts(self.step, result, kind=kind))
            # a rerun of a finished run does nothing: its newest checkpoint stays the answer
            if saved_at != self.step and (self.step > first_step or resumed is None):
                path, saved_at = self.save(), self.step
            for line in self.bad_inputs.lines(self.step) + [self.bad_inputs.summary()]:
                if line:
                    log.message(line)
        finally:
            log.close()
        curves = write_training_curves(self.out_dir, cfg.run.name) if self.rank == 0 else None
        if preempted and self.rank == 0:
            what = f"checkpoint {path} written at step {self.step}" if saved_at == self.step else \
                f"nothing new since checkpoint {path} (step {self.step})"
            print(f"preempted: {what}; rerun the same command to resume (stop requested by {self.stop.signal_name})",
                  flush=True)
        return {"step": self.step, "checkpoint": str(path) if path else None, "preempted": preempted,
                "stopped_early": stopped_early, "curves": curves, **last,
                "bad_input": dict(self.bad_inputs.total)}  # the job's, by kind (rank 0; {} elsewhere)
