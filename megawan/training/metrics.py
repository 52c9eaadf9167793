"""What the trainer shows: TensorBoard event files, a JSON-lines metrics file, a tqdm bar and summaries.

Only global rank 0 writes. ``metrics.jsonl`` has one object per logged step (and one per validation), so
curves can be read without TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import psutil
import torch

logger = logging.getLogger("megawan.train")


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated memory of this rank: CUDA's allocator peak, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    def __init__(self, log_dir: Path, *, enabled: bool, total_steps: int, start_step: int, every: int,
                 tensorboard: bool, progress_bar: bool):
        self.enabled, self.every = enabled, max(1, every)
        self.writer = self.bar = self.file = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(log_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.monotonic()

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
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
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
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def message(self, line: str) -> None:
        if self.enabled:
            self._write(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
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
