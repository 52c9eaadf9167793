"""Architecture of the Wan DiT (``WanDiTConfig``) and how one run executes it (``DiTRuntime``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megawan import presets
from megawan.parallel_state.layout import CP_IMPLS


@dataclass(frozen=True)
class WanDiTConfig:
    """Defaults are Wan 2.2 TI2V-5B."""

    dim: int = 3072
    ffn_dim: int = 14336
    num_heads: int = 24
    num_layers: int = 30
    in_channels: int = 48
    out_channels: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # World-model conditioning (not in the release): robot states of each latent frame's video frames,
    # embedded and added to the time embedding per token. 0 = off (the released model).
    state_dim: int = 0
    frames_per_latent: int = 4  # the VAE's temporal compression: video frames behind one latent frame

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head_dim {self.dim // self.num_heads} must be even for RoPE")
        if self.state_dim < 0 or self.frames_per_latent < 1:
            raise ValueError(f"state_dim must be >= 0 and frames_per_latent >= 1 "
                             f"(got {self.state_dim}, {self.frames_per_latent})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_features(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    @classmethod
    def from_dict(cls, d: dict) -> "WanDiTConfig":
        """Accept megawan's own keys, the official release's config.json or diffusers' config.json.

        Release keys megawan implements one way only (``qk_norm``, ``window_size``, ...) must hold
        that value; any other is refused, never ignored.
        """
        _check_fixed_release_keys(d)
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _IGNORED_RELEASE_KEYS}
        if "num_attention_heads" in d:  # diffusers WanTransformer3DModel
            d = {"dim": d["num_attention_heads"] * d["attention_head_dim"], "num_heads": d["num_attention_heads"],
                 "ffn_dim": d["ffn_dim"], "num_layers": d["num_layers"], "in_channels": d["in_channels"],
                 "out_channels": d["out_channels"], "patch_size": d.get("patch_size", (1, 2, 2)),
                 "freq_dim": d["freq_dim"], "text_dim": d["text_dim"], "eps": d["eps"],
                 **{k: d[k] for k in ("state_dim", "frames_per_latent") if k in d}}
        elif "in_dim" in d:  # official WanModel
            d = {"dim": d["dim"], "num_heads": d["num_heads"], "ffn_dim": d["ffn_dim"],
                 "num_layers": d["num_layers"], "in_channels": d["in_dim"], "out_channels": d["out_dim"],
                 "patch_size": d.get("patch_size", (1, 2, 2)), "freq_dim": d["freq_dim"],
                 "text_dim": d.get("text_dim", 4096), "text_len": d.get("text_len", 512), "eps": d["eps"],
                 **{k: d[k] for k in ("state_dim", "frames_per_latent") if k in d}}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown WanDiTConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> "WanDiTConfig":
        """A preset shipped with the package: "tiny" (tests) or "wan2.2-ti2v-5b"."""
        return cls.from_dict(presets.load("dit", name))

    @classmethod
    def load(cls, name_or_path: str | Path) -> "WanDiTConfig":
        """A JSON file, a checkpoint directory holding config.json, or a preset name."""
        p = Path(name_or_path)
        if p.is_dir():
            p = p / "config.json"
        elif not p.exists():
            if str(name_or_path) in presets.names("dit"):
                return cls.preset(str(name_or_path))
            raise FileNotFoundError(
                f"no DiT config at {name_or_path!r}: neither a file, a checkpoint directory nor a preset "
                f"({presets.names('dit')}). Pass the local folder of a download (nothing is downloaded): the root "
                f"of Wan-AI/Wan2.2-TI2V-5B, or the transformer/ folder of Wan-AI/Wan2.2-TI2V-5B-Diffusers "
                f"(see the README's 'Released weights')")
        d = json.loads(p.read_text())
        d = d.get("dit", d)
        try:
            return cls.from_dict(d)
        except ValueError as err:
            raise ValueError(f"{p}: {err}") from None

    def _state_keys(self) -> dict:
        """megawan's own keys, written only for a state-conditioned model (the release has none)."""
        return {"state_dim": self.state_dim, "frames_per_latent": self.frames_per_latent} if self.state_dim else {}

    def to_official(self) -> dict:
        return {**self._state_keys(), "_class_name": "WanModel", "model_type": "ti2v", "dim": self.dim, "ffn_dim": self.ffn_dim,
                "num_heads": self.num_heads, "num_layers": self.num_layers, "in_dim": self.in_channels,
                "out_dim": self.out_channels, "patch_size": list(self.patch_size), "freq_dim": self.freq_dim,
                "text_dim": self.text_dim, "text_len": self.text_len, "eps": self.eps,
                "window_size": [-1, -1], "qk_norm": True, "cross_attn_norm": True}

    def to_diffusers(self) -> dict:
        return {**self._state_keys(), "_class_name": "WanTransformer3DModel", "num_attention_heads": self.num_heads,
                "attention_head_dim": self.head_dim, "ffn_dim": self.ffn_dim, "num_layers": self.num_layers,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "patch_size": list(self.patch_size), "freq_dim": self.freq_dim, "text_dim": self.text_dim,
                "eps": self.eps, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
                "rope_max_seq_len": 1024}


# Release config keys for behaviour megawan implements one way only: the values that behaviour has in
# the official (first) and diffusers (second) spelling. Any other value describes another model
# (windowed attention, no q/k or cross-attention norm, an I2V image branch) and is refused.
_FIXED_RELEASE_KEYS = {
    "qk_norm": (True, "rms_norm_across_heads"),
    "cross_attn_norm": (True,),
    "window_size": ([-1, -1],),
    "image_dim": (None,),
    "added_kv_proj_dim": (None,),
    "pos_embed_seq_len": (None,),
}
# Keys that carry no architecture megawan needs: pipeline metadata, and rope_max_seq_len (the length of
# diffusers' precomputed RoPE table; megawan computes RoPE for the actual grid).
_IGNORED_RELEASE_KEYS = {"model_type", "rope_max_seq_len", "_diffusers_version", *_FIXED_RELEASE_KEYS}


def _check_fixed_release_keys(d: dict) -> None:
    for key, allowed in _FIXED_RELEASE_KEYS.items():
        value = d.get(key, allowed[0])
        value = list(value) if isinstance(value, tuple) else value
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not supported (megawan implements only "
                             f"{' / '.join(repr(a) for a in allowed)}): this config describes another model")


RECOMPUTE_GRANULARITIES = ("full", "selective", "ffn")


@dataclass(frozen=True)
class DiTRuntime:
    """How the model runs: precision, parallel switches and kernels (not part of the architecture).

    dtype: dtype of the attention/FFN GEMM weights; embeddings, modulation, norms and the head stay
        fp32 as in the release.
    residual_dtype: dtype of the residual stream (the tokens between and through the blocks):
        float32, the release's numerics (default), or bf16 / fp16, the faster, lower-precision option
        (half the stream's memory traffic in the element-wise passes and half the activations a
        recomputing block keeps; diffusers' ``WanTransformer3DModel`` run in bf16 does the same).
        Norms, modulation and gates still compute in fp32; each residual add is rounded to
        ``residual_dtype``. Its error against the release: docs/dit.md.
    sequence_parallel: Megatron SP on the residual stream (only meaningful with tp > 1).
    linear_impl: "auto" | "local" (megatron-core) | "te" (Transformer Engine). "auto" is "local" unless
        a te-* FP8 mode asks for TE's linears: TE is never picked because it is installed.
    attention_backend: "auto" | "torch" | "cudnn" | "flash" | "te"; resolved once and logged
        (megawan/layers/attention_kernels.py: "auto" = SDPA's own dispatch, on every device; "cudnn"
        pins cuDNN attention, an explicit choice).
    activation_checkpointing: recompute in backward, as ``recompute_granularity`` and
        ``recompute_num_blocks`` say (off: every activation is kept).
    recompute_granularity: what a recomputing block recomputes:
        "full": the whole block (only its inputs are kept);
        "selective": the whole block except the attention cores: their outputs (and softmax
            statistics) are kept, everything else (GEMMs, norms, RoPE, modulation) is recomputed;
            applies to SDPA kernels ("auto", "torch", "cudnn");
        "ffn": only the FFN half (norm2, modulation, fc1, GELU, fc2, gate); the attentions keep
            their activations. The cheapest in FLOPs: it frees the [L, ffn_dim] intermediates.
    recompute_num_blocks: how many blocks recompute (the first N, Megatron's "block" method); the
        others keep everything. None = all blocks.
    compile_blocks: ``torch.compile`` each block (regional compilation: one graph reused by all
        blocks). None = on when the model runs on CUDA, off on CPU and with Transformer Engine modules
        (their forwards break dynamo's graph; True with TE modules is refused).
    init_weights: initialise the parallel linears (off when weights are loaded right after).
    fp8: FP8 GEMMs in the blocks' linears (self-attention q/k/v and o, cross-attention q, k, v and o,
        FFN fc1 and fc2): "off" | "native-tensorwise" | "native-rowwise" (torch._scaled_mm, runs
        everywhere) | "te-delayed" | "te-current" (Transformer Engine). See megawan/layers/fp8.py.
        Embeddings, modulation and head stay in high precision; master weights and checkpoints too.
    fp8_bf16_blocks: keep the first and the last N blocks' GEMMs in ``dtype`` (0: every block in FP8).
    fp8_attention: TE's FP8 dot-product attention (te-* modes with attention_backend "te" only).
    cp_impl: how self-attention spans the context-parallel ranks: "ulysses" (all-to-all of heads;
        (heads / tp) % cp == 0), "ring" (ring attention, any cp) or "hybrid" (Ulysses inside groups of
        ``ulysses_size`` CP ranks, ring across them); None = what the ``ParallelGroups`` were built for
        (``parallel_state.initialize(cp_impl=...)``). See megawan/parallel_state/layout.py.
    ulysses_size: the Ulysses group size of "hybrid" (dividing cp); None otherwise.
    """

    dtype: torch.dtype = torch.float32
    residual_dtype: torch.dtype = torch.float32
    sequence_parallel: bool = True
    linear_impl: str = "auto"
    attention_backend: str = "auto"
    activation_checkpointing: bool = False
    recompute_granularity: str = "full"
    recompute_num_blocks: int | None = None
    compile_blocks: bool | None = None
    init_weights: bool = True
    fp8: str = "off"
    fp8_bf16_blocks: int = 0
    fp8_attention: bool = False
    cp_impl: str | None = None
    ulysses_size: int | None = None

    def __post_init__(self):
        if self.cp_impl is not None and self.cp_impl not in CP_IMPLS:
            raise ValueError(f"cp_impl must be one of {CP_IMPLS} or None, got {self.cp_impl!r}")
        if self.ulysses_size is not None and self.cp_impl != "hybrid":
            raise ValueError(f"ulysses_size={self.ulysses_size} applies to cp_impl 'hybrid' only, "
                             f"got cp_impl={self.cp_impl!r}")
        if self.residual_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"residual_dtype must be torch.float32 (the release's), torch.bfloat16 or "
                             f"torch.float16, got {self.residual_dtype}")
        if self.fp8_bf16_blocks < 0:
            raise ValueError(f"fp8_bf16_blocks must be >= 0, got {self.fp8_bf16_blocks}")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise ValueError(f"recompute_granularity must be one of {RECOMPUTE_GRANULARITIES}, "
                             f"got {self.recompute_granularity!r}")
        if self.recompute_num_blocks is not None and self.recompute_num_blocks < 0:
            raise ValueError(f"recompute_num_blocks must be >= 0 or None, got {self.recompute_num_blocks}")

    def block_recompute(self, index: int) -> str | None:
        """What block ``index`` recomputes in backward: a granularity, or None (keeps everything)."""
        if not self.activation_checkpointing:
            return None
        if self.recompute_num_blocks is not None and index >= self.recompute_num_blocks:
            return None
        return self.recompute_granularity
