"""The planner's rates, in one place: what each figure is, where it comes from, and which were never measured.

MEASURED (docs/benchmarks.md, the shared GPU notes: one H100 80GB HBM3, bf16, 121 x 704 x 1280 = 27,280 tokens):
the block GEMMs 695-797 TFLOP/s, cuDNN self-attention 590 fwd / 475 fwd+bwd TFLOP/s, and megawan's whole block
(fwd / fwd+bwd) 392 / 383 TFLOP/s eager and 550 / 490 compiled; at 5,120 tokens eager 294 / 320 (kept here as the
check of the model: tests/test_plan.py). The block time the planner predicts is
    3 x GEMM FLOPs / GEMM rate + 3 x attention-core FLOPs / attention rate + per-token time x tokens,
where the per-token time (norms, modulation, RoPE, element-wise work: memory-bound, linear in the tokens) is what
the 27,280-token measurement leaves after its kernels (``per_token_seconds``).

STATED, NOT MEASURED here (datasheet / documentation figures): memory capacities, HBM bandwidth, link bandwidths,
and every overlap parameter (``OVERLAP``): no multi-GPU or multi-node job has run on this project's machines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
MIB = 2**20
TFLOPS = 1e12
GBPS = 1e9

# The measurements the compute model is calibrated on (one H100, bf16, 24 heads x 128, dim 3072, ffn 14336).
MEASURED_TOKENS = 27_280
MEASURED_BLOCK_TFLOPS = {  # megawan's whole block at MEASURED_TOKENS
    "eager": {"fwd": 392.0, "fwd+bwd": 383.0},
    "compiled": {"fwd": 550.0, "fwd+bwd": 490.0},
}
# Held out (not used to calibrate): eager at 5,120 tokens, and the full 5B train step with full recomputation at
# 27,280 tokens, batch 1, one GPU: eager 5.74 s, compiled (megawan blocks compiled) 4.50 s.
CHECK_BLOCK_TFLOPS_5120_EAGER = {"fwd": 294.0, "fwd+bwd": 320.0}
CHECK_TRAIN_STEP_SECONDS = {"eager": 5.74, "compiled": 4.50}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float  # what torch reports as total_memory
    gemm_tflops: float  # bf16 GEMMs of the block's shapes, sustained
    attention_tflops: dict = field(default_factory=dict)  # attention core, {"fwd": .., "fwd+bwd": ..}
    hbm_gbps: float = 0.0  # memory bandwidth (the optimizer step is bound by it)
    peak_tflops: float = 0.0  # dense bf16 datasheet peak (MFU's denominator, logging.peak_tflops)
    source: str = ""


GPUS = {
    "h100": GPU("H100 80GB HBM3 (SXM)", memory_bytes=81_008 * MIB,
                gemm_tflops=745.0,  # the middle of the measured 695-797 for qkv, o, fc1, fc2 at 27,280 tokens
                attention_tflops={"fwd": 590.0, "fwd+bwd": 475.0},  # cuDNN through SDPA, measured
                hbm_gbps=3350.0, peak_tflops=989.0,
                source="rates measured on one H100 (docs/benchmarks.md); memory as torch reports an H100 80GB "
                       "(81,008 MiB), HBM 3.35 TB/s and 989 TFLOP/s from NVIDIA's H100 SXM datasheet"),
    "h200": GPU("H200 141GB HBM3e (SXM)", memory_bytes=143_771 * MIB,
                gemm_tflops=745.0, attention_tflops={"fwd": 590.0, "fwd+bwd": 475.0},
                hbm_gbps=4800.0, peak_tflops=989.0,
                source="the same Hopper die as the H100: its measured rates assumed (not measured on an H200); "
                       "memory as torch reports an H200 (143,771 MiB), HBM 4.8 TB/s from NVIDIA's datasheet"),
}


@dataclass(frozen=True)
class Link:
    name: str
    gbps: float  # bytes per second per GPU and direction, sustained by NCCL (stated)
    source: str


LINKS = {
    "nvlink": Link("NVLink 4 (inside a node, NVSwitch)", 360.0,
                   "450 GB/s per GPU and direction (NVIDIA H100 SXM datasheet: 900 GB/s bidirectional); 80% of it "
                   "as NCCL's sustained bus bandwidth (stated, not measured here)"),
    "ib": Link("InfiniBand NDR 400 Gb/s (across nodes, one NIC per GPU)", 45.0,
               "400 Gb/s = 50 GB/s per GPU and direction (one ConnectX-7 NIC per GPU, the usual H100 node); 90% of "
               "it sustained (stated, not measured here)"),
}

# ---- UNTESTED: how much communication hides behind compute. Nothing here was measured: no multi-GPU run. ----
OVERLAP = {
    # megatron DDP's overlap_grad_reduce (on with CUDA): the gradient reduce-scatter runs during the last
    # micro-batch's backward; this share of that backward can hide it
    "dp_grad_reduce": 0.9,
    # the distributed optimizer's parameter all-gather after the step: overlap_param_gather is off in megawan
    "dp_param_gather": 0.0,
    # TP / SP all-gathers and reduce-scatters, q/k-norm all-reduces, Ulysses all-to-alls: synchronous
    # collectives in the block's dataflow (megawan/layers/tp_gemm.py, attention.py): nothing hides
    "tp": 0.0,
    "ulysses": 0.0,
    # ring attention's point-to-point sends run on NCCL's streams beside each ring step's attention: a step's
    # send hides behind that step's attention compute up to this share of it (written, never run on a GPU)
    "ring": 1.0,
}
