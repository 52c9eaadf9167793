"""WanDiT: Wan 2.2 TI2V-5B's diffusion transformer on Megatron-Core parallel layers.

Parallel layout (see megawan/layers/token_shards.py): tokens are split over CP, then over TP by
sequence parallelism; every parameter is either split across TP (megatron's
``tensor_model_parallel`` / ``partition_dim`` attributes) or replicated (then tagged
``sequence_parallel`` when its gradient is a partial sum over this rank's tokens, as Megatron does).
Under CP every gradient is a partial sum over CP ranks (they fold into the data-parallel reduction).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from torch import nn

from megawan import parallel_state
from megawan.checkpoint.dit_io import load_dit_weights, save_dit_weights
from megawan.layers import compile_compat, fused
from megawan.layers.attention import CrossAttention, FeedForward, SelfAttention
from megawan.layers.backend import DiTBackend
from megawan.layers.embeddings import PatchEmbedding, StateEmbedding, WanHead, timestep_sinusoid
from megawan.layers.norms import FP32LayerNorm
from megawan.layers.rope import rope_tables
from megawan.layers.token_shards import TokenShards
from megawan.models.dit_config import DiTRuntime, WanDiTConfig
from megawan.parallel_state import ParallelGroups

__all__ = ["WanDiT", "WanBlock", "WanDiTConfig", "DiTRuntime"]


class WanBlock(nn.Module):
    """One Wan block: modulated self-attention, cross-attention (no gate), modulated FFN.

    ``recompute`` (None, "full", "selective", "ffn"; see ``DiTRuntime``) is applied inside
    ``forward``, so a compiled block traces its checkpoint too (the partitioner then recomputes).
    """

    def __init__(self, cfg: WanDiTConfig, backend: DiTBackend, dtype: torch.dtype, recompute: str | None = None):
        super().__init__()
        args = (cfg.dim, cfg.num_heads, cfg.eps, backend)
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        self.self_attn = SelfAttention(*args)
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(*args)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, backend)
        self.eps, self.dtype, self.recompute = cfg.eps, dtype, recompute
        # The backend's checkpoint: TE's in te-* FP8 modes, which recomputes under the forward's FP8
        # state (torch's would recompute in backward, outside fp8_autocast: other values than the saved ones)
        self._checkpoint = backend.checkpoint
        if recompute == "selective" and backend._te_fp8:
            warnings.warn("recompute_granularity='selective' under a te-* FP8 mode recomputes the attention "
                          "too (TE's checkpoint has no selective policy), as 'full'", stacklevel=2)

    def forward(self, x, e0, context, rope_cos, rope_sin, num_tokens: int):
        """x [s, b, dim] (the residual stream: fp32, or ``DiTRuntime.residual_dtype``); e0 [s or 1, b, 6,
        dim] fp32; context [512, b, dim] in the TP region."""
        args = (x, e0, context, rope_cos, rope_sin, num_tokens)
        if self.recompute in ("full", "selective") and self._recomputing():
            return self._checkpoint(self._forward, *args, selective=self.recompute == "selective")
        return self._forward(*args)

    def _recomputing(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _forward(self, x, e0, context, rope_cos, rope_sin, num_tokens: int):
        # Six separate [s, b, dim] sums rather than views of one [s, b, 6, dim] sum: what backward keeps
        # (scales, gates) then holds only those chunks, not the whole per-token sum per block.
        mod = self.modulation.float()
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, i] + e0[:, :, i] for i in range(6))
        h = fused.maybe_compiled(fused.modulated_layer_norm, x)(x, shift1, scale1, self.eps, self.dtype)
        x = fused.maybe_compiled(fused.gated_residual, x)(x, self.self_attn(h, (rope_cos, rope_sin), num_tokens),
                                                           gate1)
        # fp32 stream + bf16 output -> fp32 by promotion (no copy); a bf16 stream stays bf16
        x = x + self.cross_attn(self.norm3(x).to(self.dtype), context)
        if self.recompute == "ffn" and self._recomputing():
            return self._checkpoint(self._ffn, x, shift2, scale2, gate2)
        return self._ffn(x, shift2, scale2, gate2)

    def _ffn(self, x, shift, scale, gate):
        h = fused.maybe_compiled(fused.modulated_layer_norm, x)(x, shift, scale, self.eps, self.dtype)
        return fused.maybe_compiled(fused.gated_residual, x)(x, self.ffn(h), gate)


def compile_blocks(blocks) -> None:
    """Regional compilation: ``torch.compile`` each block in place. The blocks share one code object
    and their parameters are graph inputs, so the first block's graph serves all of them.

    The whole ``forward`` is one graph, collectives and recomputation included, in every TP / SP / CP
    layout: the linears are megatron-core's local ones (run through megawan's synchronous-collective
    function at TP > 1, megawan/layers/tp_gemm.py), the Ulysses all-to-alls and the q/k-norm all-reduce
    are megatron's / megawan's autograd functions over plain collectives, which dynamo turns into
    functional collectives; dynamo traces the checkpoint and the partitioner applies the "selective"
    policy. Blocks with Transformer Engine modules are never compiled
    (``megawan.layers.backend.resolve_compile_blocks``).
    """
    compile_compat.install()
    for block in blocks:
        block.compile()


class WanDiT(nn.Module):
    """Wan 2.2 DiT for one TP x CP x DP layout.

    forward(latents [B, C, F, H, W], timestep [B] or per-token [B, L], text [B, <=text_len, text_dim],
    states [B, T, state_dim] (world model only; T = frames_per_latent * (F - 1) + 1 video frames))
    returns the velocity [B, C_out, F, H, W], complete on every rank.

    Initialisation (a from-scratch model) is one path for every layout and device: every weight is
    drawn whole on the CPU from the global RNG, in construction order, and each rank keeps its TP slice
    (``DiTBackend.build``), then the model moves to ``groups.device``. So the same seed gives the same
    model at any TP / CP / DP and on CPU or GPU. ``seed``: draw from a CPU generator seeded with it
    (the caller's RNG state is left as it was); None: from the global RNG as it stands
    (``torch.manual_seed`` first).
    """

    def __init__(self, config: WanDiTConfig, groups: ParallelGroups | None = None,
                 runtime: DiTRuntime | None = None, *, seed: int | None = None):
        super().__init__()
        if seed is None:
            self._build(config, groups, runtime)
            return
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: init never draws on a GPU
            torch.default_generator.manual_seed(seed)
            self._build(config, groups, runtime)

    def _build(self, config: WanDiTConfig, groups: ParallelGroups | None, runtime: DiTRuntime | None) -> None:
        groups = groups or parallel_state.get_groups()
        rt = runtime or DiTRuntime()
        groups.layout_for(rt.cp_impl, rt.ulysses_size).validate(config.num_heads)
        self.config, self.groups, self.runtime = config, groups, rt
        # A plain object, built once: the linears and kernels it builds are submodules of the blocks.
        self.backend = DiTBackend.build(groups, rt)
        self.sequence_parallel = self.backend.sequence_parallel
        d = config.dim
        self.patch_embedding = PatchEmbedding(config.in_channels, d, config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.state_embedding = (StateEmbedding(config.state_dim, config.frames_per_latent, d)
                                if config.state_dim else None)
        # Each block's backend: the model's, or the same with FP8 off for the first / last fp8_bf16_blocks.
        n, edge = config.num_layers, rt.fp8_bf16_blocks
        self._block_backends = [self.backend.high_precision() if i < edge or i >= n - edge else self.backend
                                for i in range(n)]
        self.blocks = nn.ModuleList(WanBlock(config, b, rt.dtype, rt.block_recompute(i))
                                    for i, b in enumerate(self._block_backends))
        self.head = WanHead(d, config.out_channels * config.patch_features, config.eps)
        self._tag_replicated_params()
        self.to(groups.device)
        if self.backend.compile_blocks:
            compile_blocks(self.blocks)

    def _tag_replicated_params(self) -> None:
        """Mark replicated params whose grads are partial sums over this rank's sequence shard.

        The text embedder is the exception: it sees the whole text on every rank and its output
        grad is all-reduced over TP on entering the TP region, so its grads are already complete
        within a CP rank.
        """
        text_params = {id(p) for p in self.text_embedding.parameters()}
        for p in self.parameters():
            if getattr(p, "tensor_model_parallel", False) or id(p) in text_params:
                continue
            p.sequence_parallel = self.sequence_parallel

    # ---- forward pieces -------------------------------------------------------------------------

    def _check_inputs(self, latents, timestep, text, states=None) -> tuple[int, int, int]:
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, F, H, W], got {tuple(latents.shape)}")
        b = latents.shape[0]
        grid = []
        for size, p, name in zip(latents.shape[2:], cfg.patch_size, "FHW"):
            if size % p:
                raise ValueError(f"latent {name}={size} is not divisible by patch size {p}")
            grid.append(size // p)
        num_tokens = grid[0] * grid[1] * grid[2]
        if timestep.shape not in ((b,), (b, num_tokens)):
            raise ValueError(f"timestep must be [B]={b} or per-token [B, L]=[{b}, {num_tokens}], "
                             f"got {tuple(timestep.shape)}")
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim or text.shape[1] > cfg.text_len:
            raise ValueError(f"text must be [B={b}, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(text.shape)}")
        if states is not None:
            if not cfg.state_dim:
                raise ValueError("states were given but this model has no state conditioning (config state_dim=0)")
            frames = cfg.frames_per_latent * (latents.shape[2] - 1) + 1
            if tuple(states.shape) != (b, frames, cfg.state_dim):
                raise ValueError(f"states must be [B, T, state_dim] = [{b}, {frames}, {cfg.state_dim}] "
                                 f"({latents.shape[2]} latent frames), got {tuple(states.shape)}")
        device = self.patch_embedding.weight.device
        for name, t in (("latents", latents), ("timestep", timestep), ("text", text), ("states", states)):
            if t is None:
                continue
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but the model is on {device}: move the inputs "
                                 f"to the model's device (model.groups.device) before calling it")
        return tuple(grid)

    def _shards(self, num_tokens: int) -> TokenShards:
        g = self.groups
        return TokenShards(num_tokens, g.tp, g.cp, g.tp_rank, g.cp_rank, self.sequence_parallel,
                           g.tp_group, g.cp_group)

    def _patchify(self, latents: torch.Tensor, grid) -> torch.Tensor:
        """[B, C, F, H, W] -> [L, B, C*pt*ph*pw], tokens in (frame, row, col) order."""
        b, c = latents.shape[:2]
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        x = latents.reshape(b, c, f, pt, h, ph, w, pw).permute(2, 4, 6, 0, 1, 3, 5, 7)
        return x.reshape(f * h * w, b, c * pt * ph * pw)

    def _unpatchify(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[L, B, pt*ph*pw*C] (features ordered (pt, ph, pw, c)) -> [B, C, F, H, W]."""
        (pt, ph, pw), (f, h, w) = self.config.patch_size, grid
        b = x.shape[1]
        x = x.reshape(f, h, w, b, pt, ph, pw, -1).permute(3, 7, 0, 4, 1, 5, 2, 6)
        return x.reshape(b, -1, f * pt, h * ph, w * pw)

    def _time_embeddings(self, timestep: torch.Tensor, shards: TokenShards, grid, states=None):
        """e [s or 1, B, dim] and e0 [s or 1, B, 6, dim] for this rank's tokens, fp32.

        With states, each token's e gains its latent frame's state embedding (then e is per token).
        """
        start, end = shards.local_range
        if timestep.ndim == 1:
            t = timestep[None, :]
        else:  # per-token: only this rank's tokens (the [L, 6, dim] modulation is never materialised whole)
            t = shards.pad(timestep.t())[start:end]
        e = self.time_embedding(timestep_sinusoid(t, self.config.freq_dim).float())
        if states is not None and self.state_embedding is not None:
            per_frame = self.state_embedding(states, grid[0])  # [B, F, dim]
            # padding tokens (past the last frame) take the last frame's: they are dropped at the end
            frame = (torch.arange(start, end, device=e.device) // (grid[1] * grid[2])).clamp(max=grid[0] - 1)
            e = e + per_frame[:, frame].transpose(0, 1)
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    def _text_context(self, text: torch.Tensor) -> torch.Tensor:
        """[B, Lt, text_dim] -> [text_len, B, dim] (zero-padded to text_len), entered in the TP region."""
        cfg = self.config
        text = text.float().transpose(0, 1)
        if text.shape[0] < cfg.text_len:
            text = torch.cat([text, text.new_zeros(cfg.text_len - text.shape[0], *text.shape[1:])])
        context = self.text_embedding(text).to(self.runtime.dtype)
        if self.groups.tp > 1:
            # One all-reduce of the context grad for all blocks (instead of one per block).
            context = copy_to_tensor_model_parallel_region(context, group=self.groups.tp_group)
        return context

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                states: torch.Tensor | None = None) -> torch.Tensor:
        grid = self._check_inputs(latents, timestep, text, states)
        shards = self._shards(grid[0] * grid[1] * grid[2])
        x = shards.scatter(shards.pad(self._patchify(latents.float(), grid)))
        x = self.patch_embedding(x).to(self.runtime.residual_dtype)
        e, e0 = self._time_embeddings(timestep, shards, grid, states)
        context = self._text_context(text)
        start, end = shards.cp_chunk
        cos, sin = rope_tables(self.config.head_dim, grid, start, end, shards.num_tokens,
                               self.config.rope_theta, device=x.device)
        with self.backend.fp8_autocast():
            for block, backend in zip(self.blocks, self._block_backends):
                with backend.block_context():
                    x = block(x, e0, context, cos, sin, shards.num_tokens)
        out = shards.gather(self.head(x, e))[: shards.num_tokens]
        return self._unpatchify(out, grid)

    # ---- checkpoints ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, groups: ParallelGroups | None = None,
                        runtime: DiTRuntime | None = None, state_dim: int | None = None) -> "WanDiT":
        """Build the model for the current layout from a released checkpoint directory and load it.

        Reads ``config.json`` (official or diffusers), detects the key layout, and reads only this
        rank's TP slices of each tensor (lazy safetensors slicing). ``state_dim`` adds world-model
        state conditioning to a released model (its embedder starts at zero: outputs are unchanged).
        The GEMM dtype comes from one place: ``dtype`` when given (it sets the runtime's), else
        ``runtime.dtype`` (float32 without either). A runtime whose dtype was set to something other than
        the default float32 and disagrees with ``dtype`` is an error naming both, never a silent pick.
        """
        runtime = runtime or DiTRuntime()
        if dtype is not None and dtype != runtime.dtype:
            if runtime.dtype != DiTRuntime().dtype:
                raise ValueError(f"from_pretrained(dtype={dtype}) disagrees with runtime.dtype={runtime.dtype}: "
                                 f"give the dtype once (dtype= or DiTRuntime(dtype=...))")
            runtime = replace(runtime, dtype=dtype)
        config = WanDiTConfig.load(path)
        if state_dim is not None:
            config = replace(config, state_dim=state_dim)
        model = cls(config, groups, replace(runtime, init_weights=False))
        load_dit_weights(model, path)
        return model

    def save_pretrained(self, path, layout: str = "official", max_shard_bytes: int = 5 * 2**30) -> None:
        """Write the full model (gathered over TP) in the official or diffusers layout, from rank 0."""
        save_dit_weights(self, path, layout=layout, max_shard_bytes=max_shard_bytes)

