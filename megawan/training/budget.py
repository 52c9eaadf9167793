"""What a training step costs: model FLOPs (for MFU) and each rank's memory (checked before building).

FLOPs (``dit_flops``) count the GEMMs and the attention cores of the blocks, as bench/bench_dit_block_gpu.py
does, plus the embeddings and the head; forward + backward = 3 x forward. Recomputation (activation
checkpointing) is not counted: MFU measures useful model FLOPs, as Megatron reports it. FP8 GEMMs count
as the same (bf16-equivalent) FLOPs.

Memory (``estimate_memory``) per rank, in bytes, for megawan's layout (TP splits the block GEMMs and
q/k-norm weights; everything else is replicated):
- weights: GEMM weights and biases in the compute dtype, the rest (norms, embeddings, head) fp32;
- gradients: megatron DDP's fp32 grad buffer (grad_reduce_in_fp32), one per parameter;
- optimizer: the distributed optimizer's fp32 master copy + Adam's two moments (12 B / param), sharded
  over the DP x CP ranks; an EMA adds 4 B / param, sharded the same way (``optim.ShardedEMA``: each rank
  averages its own master slice);
- activations, per recomputation granularity (``DiTRuntime.recompute_granularity``) of the recomputing
  blocks (the first ``recompute_num_blocks``; the others keep everything):
  * "full": only the block input (the residual stream, 4 or 2 B per feature), plus one block's worth
    during its recomputation;
  * "selective": the input plus the two attention cores' outputs (compute dtype) and softmax
    statistics (fp32, one per head);
  * "ffn": everything except the FFN's hidden activations and its input, which it recomputes from the
    stream;
  * none: what the block's backward needs, from its dataflow (``_block_activation_bytes_per_token``).
  "full" and "selective" are exact (tests/test_budget.py measures them on a real forward); the dataflow
  figure assumes the fused element-wise functions (GPU, compiled); CPU eager holds more (docs/training.md).
  Context parallelism keeps the same activations whatever ``cp_impl`` (Ulysses' whole-sequence q/k/v for
  heads/(tp cp) heads hold as many bytes as ring attention's local blocks for heads/tp); ring and hybrid
  add the ring's buffers of one self-attention at a time (``_ring_buffer_bytes_per_token``).

Beyond the estimate, a rank needs memory the model does not account for (``device_reserve``): on a GPU
the CUDA context with cuBLAS / cuDNN workspaces, NCCL's communication buffers and allocator
fragmentation, and on any device the VAE when it encodes on the fly. None of these was measured on a
GPU here: each is a stated figure or a dataflow count, named in the log and in a refusal (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from megawan.models.dit_config import WanDiTConfig
from megawan.parallel_state.layout import LayoutError, ParallelLayout

GIB = 2**30


def block_flops_parts(tokens: int, dim: int, ffn: int, text_len: int) -> tuple[int, int, int]:
    """(GEMM FLOPs, of which the FFN's, attention-core FLOPs) of one block's forward on one sample: GEMMs (q, k,
    v, o; cross q, o; cross k, v on the text; fc1, fc2) and the attention cores (self: L x L, cross: L x Lt)."""
    L, D, F, Lt = tokens, dim, ffn, text_len
    ffn_gemms = 2 * L * D * 2 * F
    gemms = 2 * L * D * (4 * D + 2 * D) + ffn_gemms + 2 * Lt * D * 2 * D
    cores = 4 * L * L * D + 4 * L * Lt * D
    return gemms, ffn_gemms, cores


def block_flops(tokens: int, dim: int, ffn: int, text_len: int) -> int:
    """Forward FLOPs of one block on one sample (``block_flops_parts``: GEMMs and attention cores)."""
    gemms, _, cores = block_flops_parts(tokens, dim, ffn, text_len)
    return gemms + cores


def dit_flops(cfg: WanDiTConfig, tokens: int, batch: int = 1, backward: bool = True) -> int:
    """Model FLOPs of a forward (x3 with backward) over ``batch`` samples of ``tokens`` video tokens."""
    D, L = cfg.dim, tokens
    embed = 2 * L * cfg.in_channels * cfg.patch_features * D + 2 * cfg.text_len * D * (cfg.text_dim + D)
    time = 2 * L * D * (cfg.freq_dim + D + 6 * D)  # per-token time MLP and projection (TI2V)
    head = 2 * L * D * cfg.out_channels * cfg.patch_features
    fwd = cfg.num_layers * block_flops(L, D, cfg.ffn_dim, cfg.text_len) + embed + time + head
    return batch * fwd * (3 if backward else 1)


def dit_param_counts(cfg: WanDiTConfig) -> tuple[int, int]:
    """(parameters split by TP, replicated parameters) of the DiT, from its config."""
    D, F = cfg.dim, cfg.ffn_dim
    split_per_block = (4 * (D * D + D)) * 2 + 4 * D + (D * F + F) + (F * D)  # q,k,v,o x2, q/k norms, fc1, fc2
    split_per_block -= 2 * D  # the two o biases are replicated (row-parallel outputs), fc2's is not counted
    replicated_per_block = 6 * D + 2 * D + 3 * D  # modulation, norm3, fc2 and o biases
    embed = (cfg.in_channels * cfg.patch_features * D + D) + (cfg.text_dim * D + D + D * D + D) \
        + (cfg.freq_dim * D + D + D * D + D) + (D * 6 * D + 6 * D)
    if cfg.state_dim:
        embed += cfg.state_dim * cfg.frames_per_latent * D + D + D * D + D
    head = D * cfg.out_channels * cfg.patch_features + cfg.out_channels * cfg.patch_features + 2 * D
    return cfg.num_layers * split_per_block, cfg.num_layers * replicated_per_block + embed + head


# Activation bytes kept per token per block for backward without recomputation, per the block dataflow
# with fused element-wise functions: fp32 residual / norm / modulation tensors ~ 10 x 4D, GEMM inputs and
# outputs in the compute dtype (q, k, v, attention out, o in, cross q / out, fc1 in) ~ 10 x cD, and the
# FFN hidden (fc1 out, GELU out) 2 x cF. Megatron SP and Ulysses split all of them over tp x cp.
def _block_activation_bytes_per_token(cfg: WanDiTConfig, compute_bytes: int = 2) -> int:
    return 10 * 4 * cfg.dim + 10 * compute_bytes * cfg.dim + 2 * compute_bytes * cfg.ffn_dim


def _ring_buffer_bytes_per_token(cfg: WanDiTConfig, tp: int, compute_bytes: int) -> float:
    """Peak bytes of ring attention's buffers per token of a CP rank (megawan/layers/ring_attention.py), in
    one self-attention's backward (more than its forward): the key/value block held and the one arriving
    (compute dtype), the fp32 key/value gradient being summed, the one received and the one in flight, and
    the fp32 query gradient; each [tokens, D/tp] per tensor."""
    return (2 * 2 * compute_bytes + 3 * 2 * 4 + 4) * cfg.dim / tp


@dataclass
class MemoryEstimate:
    weights: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        parts = ", ".join(f"{k} {getattr(self, k) / scale:.1f}" for k in ("weights", "grads", "optimizer",
                                                                          "activations"))
        return f"{self.total / scale:.1f} {unit} ({parts} {unit})"


def _recomputing_block_bytes_per_token(cfg: WanDiTConfig, granularity: str, compute_bytes: int,
                                       residual_bytes: int) -> int:
    """Bytes a recomputing block keeps per token for backward (see the module docstring)."""
    stream = residual_bytes * cfg.dim
    if granularity == "full":
        return stream
    if granularity == "selective":  # self- and cross-attention outputs + their fp32 log-sum-exp per head
        return stream + 2 * (compute_bytes * cfg.dim + 4 * cfg.num_heads)
    if granularity == "ffn":  # everything but fc1's input and the FFN hidden (fc1 out, GELU out)
        everything = _block_activation_bytes_per_token(cfg, compute_bytes)
        return everything - compute_bytes * (cfg.dim + 2 * cfg.ffn_dim) + stream
    raise ValueError(f"unknown recompute granularity {granularity!r}")


def estimate_memory(cfg: WanDiTConfig, *, tokens: int, batch: int, tp: int, cp: int, dp: int,
                    compute_bytes: int = 2, recompute: str | None = None, recompute_num_blocks: int | None = None,
                    residual_bytes: int = 4, ema: bool = False, sequence_parallel: bool = True,
                    cp_impl: str = "ulysses", ulysses_size: int | None = None) -> MemoryEstimate:
    """Per-rank bytes. ``recompute``: None (keep everything) or a granularity; ``recompute_num_blocks``:
    only the first N blocks recompute (None = all); ``residual_bytes``: 4 (fp32 stream) or 2;
    ``cp_impl`` / ``ulysses_size``: context parallelism (a ring adds its buffers)."""
    split, replicated = dit_param_counts(cfg)
    params = split / tp + replicated
    # GEMM weights and biases in the compute dtype, except the fp32 q/k-norm weights (split, 4 D per
    # block); the replicated o / fc2 biases (3 D per block) are GEMM biases: compute dtype
    norms, biases = 4 * cfg.dim * cfg.num_layers, 3 * cfg.dim * cfg.num_layers
    weights = ((split - norms) * compute_bytes + norms * 4) / tp + (replicated - biases) * 4 + biases * compute_bytes
    grads = params * 4
    optimizer = params * (12 + (4 if ema else 0)) / (dp * cp)  # master + m + v (+ EMA), DP x CP shards
    sp = tp if sequence_parallel else 1
    local_tokens = batch * tokens / (cp * sp)
    per_block = _block_activation_bytes_per_token(cfg, compute_bytes) * local_tokens
    recomputing = 0 if recompute is None else min(cfg.num_layers, recompute_num_blocks if recompute_num_blocks
                                                  is not None else cfg.num_layers)
    activations = (cfg.num_layers - recomputing) * per_block
    if recomputing:
        kept = _recomputing_block_bytes_per_token(cfg, recompute, compute_bytes, residual_bytes) * local_tokens
        activations += recomputing * kept + per_block  # + one block's worth while it recomputes
    # the per-token modulation e0 (fp32 [tokens, 6, D]) and the time embedding, kept once per forward
    activations += 7 * cfg.dim * 4 * local_tokens
    ring = ParallelLayout(tp * cp, tp, cp, cp_impl, ulysses_size).validate().ring
    if ring > 1:
        activations += _ring_buffer_bytes_per_token(cfg, tp, compute_bytes) * batch * tokens / cp
    return MemoryEstimate(weights, grads, optimizer, activations)


RECOMPUTE_ORDER = (None, "ffn", "selective", "full")  # least recomputation first


def suggest_layout(cfg: WanDiTConfig, world: int, capacity: float, **kw) -> tuple[int, int, str | None] | None:
    """(tp, cp, recompute granularity or None): the least recomputation, then the smallest tp, then cp,
    dividing ``world``, valid for ``cp_impl`` / ``ulysses_size`` (in ``kw``; Ulysses by default), whose
    estimate fits ``capacity``."""
    impl = {"cp_impl": kw.get("cp_impl", "ulysses"), "ulysses_size": kw.get("ulysses_size")}
    for recompute in RECOMPUTE_ORDER:
        for tp in (1, 2, 4, 8):
            for cp in (1, 2, 4, 8, 16, 32):
                try:
                    ParallelLayout(world, tp, cp, **impl).validate(cfg.num_heads)
                except LayoutError:
                    continue
                est = estimate_memory(cfg, tp=tp, cp=cp, dp=world // (tp * cp), recompute=recompute, **kw)
                if est.total <= capacity:
                    return tp, cp, recompute
    return None


# ---- what a rank needs beyond the model (stated, not measured: no GPU was available) --------------------

CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context (lazy module loading) + cuBLAS / cuDNN workspaces: a stated figure
# NCCL's buffers per communicator: NCCL_BUFFSIZE (default 4 MiB, NCCL's documentation) per channel and peer,
# up to 32 channels, a send and a receive peer: an upper figure for one communicator.
NCCL_BYTES_PER_COMMUNICATOR = 4 * 2**20 * 32 * 2
FRAGMENTATION_SHARE = 0.05  # of the device: the caching allocator's blocks that fit no request (stated)
# Live activations of one encoder chunk at the first (full-resolution) stage, in units of one feature map:
# the chunk's input, a residual block's two conv outputs, its shortcut, and the causal convs' cached frames.
VAE_ENCODE_LIVE_MAPS = 8


@dataclass
class DeviceReserve:
    cuda_context: float = 0.0
    nccl: float = 0.0
    fragmentation: float = 0.0
    vae: float = 0.0

    @property
    def total(self) -> float:
        return self.cuda_context + self.nccl + self.fragmentation + self.vae

    def describe(self) -> str:
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        parts = ", ".join(f"{k.replace('_', ' ')} {getattr(self, k) / scale:.1f}" for k in
                          ("cuda_context", "nccl", "fragmentation", "vae") if getattr(self, k))
        return f"{self.total / scale:.1f} {unit}" + (f" ({parts} {unit})" if parts else "")


def vae_encode_bytes(vae_params: int, base_dim: int, frames: int, height: int, width: int, shards: int,
                     weight_bytes: int = 4) -> float:
    """The on-the-fly VAE on one rank: its weights (fp32, as the trainer loads it) and one encoder chunk
    (4 frames, after the first) at the first stage (2x2 patches folded: H/2 x W/2, ``base_dim`` channels,
    fp32), spatially sharded over ``shards`` ranks, plus the clip itself on the device. A dataflow
    count (``VAE_ENCODE_LIVE_MAPS`` feature maps live at once), not a measurement."""
    chunk = 4 * (height // 2) * (width // 2) * base_dim * 4 * VAE_ENCODE_LIVE_MAPS / max(1, shards)
    clip = frames * height * width * 3 * 4
    return vae_params * weight_bytes + chunk + clip


def device_reserve(device_type: str, capacity: float, communicators: int, vae_bytes: float = 0.0) -> DeviceReserve:
    """What a rank needs beyond ``estimate_memory``: on "cuda" the context, NCCL's buffers for
    ``communicators`` groups of more than one rank, and fragmentation; on any device the VAE."""
    if device_type != "cuda":
        return DeviceReserve(vae=vae_bytes)
    return DeviceReserve(CUDA_CONTEXT_BYTES, communicators * NCCL_BYTES_PER_COMMUNICATOR,
                         FRAGMENTATION_SHARE * capacity, vae_bytes)
