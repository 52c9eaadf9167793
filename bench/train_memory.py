"""Per-GPU memory of the 5B training presets, from megawan.training.budget.estimate_memory (no GPU needed).

For each preset (8 GPUs, bf16 GEMMs, EMA on, SP on) and a few layouts: parameters held per rank, bf16/fp32
weights, the fp32 grad buffer, the distributed optimizer's shard (fp32 master + Adam m, v: 12 B/param over
dp x cp ranks), the EMA's fp32 shard (4 B/param over the same ranks), activations without recomputation, with "full" (the
presets' setting) and with "selective" recomputation in every block, and the totals. GiB.

    python bench/train_memory.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402
from megawan.models.dit_config import WanDiTConfig  # noqa: E402
from megawan.training.budget import GIB, dit_param_counts, estimate_memory  # noqa: E402

# preset -> (tokens per sample, state_dim, layouts (tp, cp) on 8 GPUs; the preset's own first)
PRESETS = {"ti2v5b_1x (77x512x512)": (5120, 25, [(1, 1), (2, 1), (1, 2)]),
           "ti2v5b_720p (121x704x1280)": (27280, 0, [(1, 2), (1, 1), (2, 2), (1, 4)])}


def rows(world: int = 8) -> list[list]:
    out = []
    for name, (tokens, state_dim, layouts) in PRESETS.items():
        cfg = dataclasses.replace(WanDiTConfig(), state_dim=state_dim)
        split, replicated = dit_param_counts(cfg)
        for tp, cp in layouts:
            kw = dict(tokens=tokens, batch=1, tp=tp, cp=cp, dp=world // (tp * cp), compute_bytes=2)
            plain = estimate_memory(cfg, ema=True, **kw)
            ckpt = estimate_memory(cfg, ema=True, recompute="full", **kw)
            sel = estimate_memory(cfg, ema=True, recompute="selective", **kw)
            ema = plain.optimizer - estimate_memory(cfg, ema=False, **kw).optimizer
            out.append([name, f"tp{tp} cp{cp} dp{world // (tp * cp)}", f"{(split / tp + replicated) / 1e9:.2f} B",
                        *(f"{v / GIB:.1f}" for v in (plain.weights, plain.grads, plain.optimizer - ema, ema,
                                                    plain.activations, ckpt.activations, sel.activations,
                                                    plain.total, ckpt.total, sel.total))])
    return out


HEADER = ["preset", "layout", "params/rank", "weights", "grads", "Adam shard", "EMA", "act", "act (full)",
          "act (selective)", "total", "total (full)", "total (selective)"]

if __name__ == "__main__":
    print(format_table(rows(), HEADER, left_columns=2))
