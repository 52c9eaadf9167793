"""Activation bytes a DiT block keeps for backward, per token, per recomputation setting (CPU, eager).

Measured, not estimated: the bytes a training forward leaves allocated (torch's CPU profiler), grown by
one more block (1 -> 2 layers) and more tokens (latent 5 x 16 x 16 -> 5 x 32 x 16), per-token timesteps
(TI2V training), so the figure is per token per block, free of the embeddings, the head and the text side. In units of D (dim) bytes, at two FFN
widths (F = 2D, 4D) so the FFN's share (2 x F x compute bytes) shows. Compare with
``megawan.training.budget`` (docs/training.md): "full" and "selective" are exact there; no recomputation
and "ffn" are estimated from the fused dataflow, which eager CPU exceeds (its element-wise chains run as
separate ops).

    python bench/activation_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402

from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402

D, HEADS = 256, 4
SETTINGS = (None, "full", "selective", "ffn")


def held_bytes(cfg, runtime, latent_h: int) -> int:
    torch.manual_seed(0)
    model = WanDiT(cfg, runtime=runtime).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 5, latent_h, 16, generator=g)
    t = torch.full((1, 5 * (latent_h // 2) * 8), 500.0)  # per-token timesteps, as TI2V training runs
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = model(x, t, text)
    del out
    return sum(e.self_cpu_memory_usage for e in prof.events())


def per_token_per_block(ffn: int, dtype, stream, setting) -> float:
    tiny = WanDiTConfig.preset("tiny")
    rt = DiTRuntime(dtype=dtype, residual_dtype=stream, linear_impl="local", attention_backend="torch",
                    activation_checkpointing=setting is not None, recompute_granularity=setting or "full")
    grown = {}
    for h in (16, 32):
        one, two = (held_bytes(WanDiTConfig(dim=D, ffn_dim=ffn, num_heads=HEADS, num_layers=n,
                                            text_dim=tiny.text_dim), rt, h) for n in (1, 2))
        grown[h] = two - one
    tokens = {h: 5 * (h // 2) * 8 for h in (16, 32)}
    return (grown[32] - grown[16]) / (tokens[32] - tokens[16])


def main() -> None:
    print(f"dim {D}, {HEADS} heads, CPU eager, torch {torch.__version__}; bytes kept per token per block, in D\n")
    rows = []
    for ffn in (2 * D, 4 * D):
        for dtype, stream in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                              (torch.bfloat16, torch.bfloat16)):
            rows.append([f"{ffn // D}D", str(dtype).removeprefix("torch."), str(stream).removeprefix("torch."),
                         *(f"{per_token_per_block(ffn, dtype, stream, s) / D:.2f}" for s in SETTINGS)])
    print(format_table(rows, ["F", "compute", "stream", "none", "full", "selective", "ffn"]))


if __name__ == "__main__":
    main()
