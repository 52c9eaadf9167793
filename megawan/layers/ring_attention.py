"""Ring attention: exact bidirectional attention over a sequence split into blocks on a ring of ranks.

Each rank of the ring group keeps its queries (block ``me`` of the sequence, in sbhd layout [s, b, h, d])
and the key/value blocks travel around the ring: at step i the rank holds block ``(me - i) % r``,
attends to it with an SDPA kernel that also returns the softmax log-sum-exp (LSE), and merges the
partial output exactly: with L = logaddexp(L_a, L_b), out = exp(L_a - L) out_a + exp(L_b - L) out_b.
Backward runs the ring again: every step computes the gradients of this rank's queries and of the
visiting key/value block from the final output and LSE (the flash-attention backward recomputes the
probabilities exp(s - L) from them, so each block's contribution is exact); the key/value gradients
accumulate in fp32 in a buffer that travels with the block and arrives at its owner after r hops.

Padding: tokens are padded at the end of the global sequence (megawan/layers/token_shards.py), so
block j of length s holds ``clamp(num_tokens - j s, 0, s)`` real keys and the rest are padding. Each
step drops the padding keys of the visiting block (exact masking, as Ulysses truncates); a block of
padding only is skipped, and its key/value gradients are zero.

Per step the next block's send/recv (``batch_isend_irecv`` to the next / from the previous rank) is
posted before the block's attention and waited for after it, so communication overlaps compute: on
NCCL the point-to-point operations run on the process group's own CUDA streams (a side stream), on
gloo on its worker threads. Bytes a rank sends per self-attention: forward (r - 1) key/value blocks;
backward (r - 1) key/value blocks and r fp32 key/value gradient blocks.

The ring forward and backward are two custom ops (``torch.library``) with an autograd formula:
``torch.compile`` treats them as opaque (no graph break in compiled blocks), and "selective"
recomputation can keep the forward's outputs as it keeps SDPA's (``RING_ATTENTION_OPS``).

Why not torch's experimental context-parallel attention (torch.distributed.tensor.experimental.
_attention, torch 2.13): it is private API (underscore module, rewritten between releases); it
dispatches only the CUDA SDPA ops (flash, efficient, cuDNN), not the CPU flash op, so it cannot run
on gloo/CPU; it takes no attention mask (its efficient-attention path raises on ``attn_bias``), so
padding keys could not be masked; and it needs a DeviceMesh and DTensor inputs with a global
monkey-patch of ``F.scaled_dot_product_attention``, while here the ring is an arbitrary process group
(the ring group of a hybrid layout) inside megatron-style autograd. Its LSE merge is the same math.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megawan.utils import group_size

_KV_TAG, _DKV_TAG = 71, 72  # gloo matches point-to-point messages by tag: keep the two streams apart

# Process groups by name: custom ops take strings, not ProcessGroup objects (``register_ring_group``).
_GROUPS: dict[str, dist.ProcessGroup] = {}


# ---- kernels that return the log-sum-exp ------------------------------------------------------------
# SDPA's kernels behind ``F.scaled_dot_product_attention`` compute the LSE and keep it for backward;
# these call them directly to get it. q [b, h, sq, d], k / v [b, h, sk, d]; lse [b, h, sq] fp32.


def lse_kernel_name(device: torch.device, dtype: torch.dtype) -> str:
    """The SDPA kernel ring attention uses on ``device`` for ``dtype`` activations."""
    if device.type == "cpu":
        return "cpu-flash"
    if device.type == "cuda":
        return "cuda-flash" if dtype in (torch.bfloat16, torch.float16) else "cuda-efficient"
    raise NotImplementedError(f"ring attention has no log-sum-exp kernel for device {device.type!r} "
                              f"(CPU and CUDA only)")


def attention_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Bidirectional attention (no mask): (out [b, h, sq, d] in q's dtype, lse [b, h, sq] fp32)."""
    kernel = lse_kernel_name(q.device, q.dtype)
    aten = torch.ops.aten
    if kernel == "cpu-flash":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
    elif kernel == "cuda-flash":
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:  # memory-efficient attention: its LSE is padded to a multiple of 32 queries
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        lse = lse[..., : q.shape[2]]
    return out, lse.float()


def attention_with_lse_backward(dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v for the attention of q to (k, v), given the FINAL out / lse of q's rows
    (over all key blocks): the kernels recompute the probabilities as exp(q k^T scale - lse), and
    rowsum(dout * out) from out, so a block's contribution is its exact share of the full gradient."""
    kernel = lse_kernel_name(q.device, q.dtype)
    aten = torch.ops.aten
    if kernel == "cpu-flash":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, False)
    if kernel == "cuda-flash":  # no dropout: the RNG state is not read; no varlen: no cumulative lengths
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, False, seed, offset)
    padded = -(-q.shape[2] // 32) * 32
    lse = torch.nn.functional.pad(lse, (0, padded - q.shape[2]))
    seed = torch.zeros((), dtype=torch.long, device=q.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, None, out, lse, seed, seed, 0.0, [True, True, True, False], False)
    return dq, dk, dv


# ---- the ring ---------------------------------------------------------------------------------------


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    return x.permute(1, 2, 0, 3)


def _valid_keys(num_tokens: int, block: int, size: int) -> int:
    """Real (non-padding) tokens of block ``block`` of ``size`` tokens: padding ends the sequence."""
    return min(max(num_tokens - block * size, 0), size)


def _send_recv(send: torch.Tensor, recv: torch.Tensor, group, tag: int) -> list:
    """Post: ``send`` to the next rank of the ring, ``recv`` from the previous one. Returns the works."""
    r, me = dist.get_world_size(group), dist.get_rank(group)
    return dist.batch_isend_irecv([
        dist.P2POp(dist.isend, send, group=group, group_peer=(me + 1) % r, tag=tag),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(me - 1) % r, tag=tag),
    ])


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _merge(out, lse, block_out, block_lse):
    """Merge a block's (out, lse) into the running fp32 (out, lse): exact softmax renormalisation."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    new = torch.logaddexp(lse, block_lse)
    out = out.mul_(torch.exp(lse - new).unsqueeze(-1)).add_(block_out * torch.exp(block_lse - new).unsqueeze(-1))
    return out, new


def _ring_forward(q, k, v, group, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    r, me = dist.get_world_size(group), dist.get_rank(group)
    size = k.shape[0]
    kv = torch.stack([k, v])  # one message per step: [2, s, b, h, d]
    qb = _bhsd(q)
    out = lse = None
    for step in range(r):
        if step < r - 1:
            incoming = torch.empty_like(kv)
            works = _send_recv(kv, incoming, group, _KV_TAG)
        valid = _valid_keys(num_tokens, (me - step) % r, size)
        if valid:
            out, lse = _merge(out, lse, *attention_with_lse(qb, _bhsd(kv[0, :valid]), _bhsd(kv[1, :valid])))
        if step < r - 1:
            _wait(works)
            kv = incoming
    # block 0 holds real keys whenever num_tokens > 0, so every rank merged at least one block
    return out.to(q.dtype).permute(2, 0, 1, 3).contiguous(), lse.contiguous()  # contiguous, as the fake says


def _ring_backward(dout, q, k, v, out, lse, group, num_tokens: int):
    r, me = dist.get_world_size(group), dist.get_rank(group)
    size = k.shape[0]
    kv = torch.stack([k, v])
    qb, doutb, outb = _bhsd(q), _bhsd(dout), _bhsd(out)
    dq = torch.zeros(qb.shape, dtype=torch.float32, device=q.device)
    travelling = None  # fp32 [2, s, b, h, d]: the key/value gradient of the block held, summed so far
    dkv_works = []
    for step in range(r):
        if step < r - 1:
            incoming = torch.empty_like(kv)
            kv_works = _send_recv(kv, incoming, group, _KV_TAG)
        valid = _valid_keys(num_tokens, (me - step) % r, size)
        local = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        if valid:
            gq, gk, gv = attention_with_lse_backward(doutb, qb, _bhsd(kv[0, :valid]), _bhsd(kv[1, :valid]),
                                                     outb, lse)
            dq += gq
            local[0, :valid] = gk.permute(2, 0, 1, 3)
            local[1, :valid] = gv.permute(2, 0, 1, 3)
        if step > 0:  # this block's gradient from the ranks it visited before
            _wait(dkv_works)
            local += travelling
        travelling = torch.empty_like(local)
        dkv_works = _send_recv(local, travelling, group, _DKV_TAG)  # the last hop returns it to its owner
        if step < r - 1:
            _wait(kv_works)
            kv = incoming
    _wait(dkv_works)
    dq = dq.to(q.dtype).permute(2, 0, 1, 3).contiguous()
    return dq, travelling[0].to(k.dtype, copy=True), travelling[1].to(v.dtype, copy=True)


# ---- custom ops (opaque to torch.compile) with their autograd formula -------------------------------


@torch.library.custom_op("megawan::ring_attention", mutates_args=())
def _ring_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str,
                       num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _ring_forward(q, k, v, _GROUPS[group_name], num_tokens)


@_ring_attention_op.register_fake
def _(q, k, v, group_name, num_tokens):
    s, b, h, _ = q.shape
    return q.new_empty(s, b, h, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32)


@torch.library.custom_op("megawan::ring_attention_backward", mutates_args=())
def _ring_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, group_name: str,
                                num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ring_backward(dout, q, k, v, out, lse, _GROUPS[group_name], num_tokens)


@_ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, group_name, num_tokens):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous


def _setup_context(ctx, inputs, output):
    q, k, v, group_name, num_tokens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.group_name, ctx.num_tokens = group_name, num_tokens


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ring_attention_backward_op(dout.contiguous(), q, k, v, out, lse, ctx.group_name,
                                             ctx.num_tokens)
    return dq, dk, dv, None, None


_ring_attention_op.register_autograd(_backward, setup_context=_setup_context)

# The forward op, for "selective" recomputation's list of attention cores whose outputs it keeps.
RING_ATTENTION_OPS = (torch.ops.megawan.ring_attention.default,)


def register_ring_group(group) -> str:
    """Record ``group`` for the ring custom ops (which take its name) and return the name. Done when a
    layer is built, so a compiled forward passes a plain string."""
    if group_size(group) < 2:
        raise ValueError("ring attention needs a ring of at least 2 ranks (one rank: call the kernel)")
    _GROUPS[group.group_name] = group  # a re-initialised layout may reuse a destroyed group's name
    return group.group_name


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str, num_tokens: int) -> torch.Tensor:
    """Attention of this rank's queries to the whole sequence held in blocks over the ring ``group_name``
    (``register_ring_group``).

    q, k, v: [s, b, h, d], block ``dist.get_rank(group)`` of the sequence (every rank the same s);
    ``num_tokens``: real tokens of the whole sequence (the rest, at its end, is padding). Returns
    [s, b, h, d].
    """
    return _ring_attention_op(q, k, v, group_name, num_tokens)[0]
