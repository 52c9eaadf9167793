"""What the trainer shows: TensorBoard event files, a JSON-lines metrics file, progress and summaries.

Only global rank 0 writes. ``metrics.jsonl`` has one object per logged step (and one per validation), so
curves can be read without TensorBoard. A run that resumes at step S first drops every record after S (the
steps it is about to redo) by rewriting the file atomically, and TensorBoard is told to purge its events
after S, so each step appears once however often the run was restarted. Progress is a tqdm bar on a
terminal and a plain line every ``logging.progress_every_s`` seconds otherwise (megawan.progress).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import psutil
import torch

from megawan.progress import ProgressLine
from megawan.utils import atomic_path

logger = logging.getLogger("megawan.train")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory of this rank: CUDA's allocator peak, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the JSON-lines file ``path`` without the records of steps after ``step`` (atomically: a crash
    leaves the old file or the new one). Returns how many records were dropped."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            dropped += 1
            continue
        if int(record.get("step", 0)) > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))
    return dropped


class MetricsLogger:
    def __init__(self, log_dir: Path, *, enabled: bool, total_steps: int, start_step: int, every: int,
                 tensorboard: bool, progress_bar: bool, progress_every_s: float = 30.0):
        self.enabled, self.every = enabled, max(1, every)
        self.progress_bar, self.progress_every_s = progress_bar, progress_every_s
        self.writer = self.progress = self.file = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        dropped = drop_records_after(log_dir / "metrics.jsonl", start_step)
        if dropped:
            logger.info("metrics.jsonl: dropped %d record(s) after step %d (steps this run does again)", dropped,
                        start_step)
        self.file = open(log_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events of steps after start_step (from a run that went further before it stopped) are dropped
            self.writer = SummaryWriter(str(log_dir / "tensorboard"), purge_step=start_step + 1)
        self.progress = ProgressLine(total_steps, initial=start_step, desc="train", unit="step",
                                     every_s=progress_every_s, enabled=progress_bar, bar=None)
        self._t0 = time.monotonic()

    def task_progress(self, total: int, desc: str, unit: str) -> ProgressLine:
        """Progress of a task inside a step (validation, rollouts), shown like the training's (a bar on a terminal,
        a timed line elsewhere, the first at once) on rank 0 only; ``close()`` it when the task ends."""
        return ProgressLine(total, desc=desc, unit=unit, every_s=self.progress_every_s,
                            enabled=self.enabled and self.progress_bar, start_line=True, leave=False)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
        if kind == "train":
            self.progress.update(step, loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            if step % self.every == 0:
                self._summary(step, metrics)
        else:
            self._write(f"step {step} {kind}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))

    def log_rollouts(self, step: int, result: dict, kind: str = "rollout") -> None:
        """Rollout scores (model and copy-last-frame baseline side by side) and the contact sheet; ``kind``
        "rollout_ema" for the EMA weights' (TensorBoard: eval_ema/*)."""
        if not self.enabled:
            return
        from megawan.evaluation import log_to_tensorboard

        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        self.file.write(json.dumps({"kind": kind, "step": step, **scalars}) + "\n")
        if self.writer is not None:
            log_to_tensorboard(self.writer, result, step, prefix="eval" + kind[len("rollout"):])
        self._write(f"step {step} {kind} ({result['num_clips']} clips): " + ", ".join(
            f"{k} {_fmt(v)}" for k, v in scalars.items() if k != "num_clips"))

    def _summary(self, step: int, m: dict) -> None:
        self._write(f"step {step}: loss {m['loss']:.4f}, grad norm {_fmt(m.get('grad_norm'))}, lr {m['lr']:.2e}, "
                    f"{m['step_time_s']:.2f} s/step, {m['samples_per_s']:.2f} samples/s, "
                    f"{m['tokens_per_s']:.0f} tokens/s, {m['tflops_per_device']:.2f} TFLOP/s/device "
                    f"(MFU {100 * m['mfu']:.1f}%), mem {m['memory_gib']:.1f} GiB")

    def _write(self, line: str) -> None:
        if self.progress is not None and self.progress.is_bar:
            self.progress.write(line)
        else:
            print(line, flush=True)

    def message(self, line: str) -> None:
        if self.enabled:
            self._write(line)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
