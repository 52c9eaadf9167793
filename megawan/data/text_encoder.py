"""umT5 text embeddings the way Wan uses them: tokens up to 512, the encoder's last hidden state, and
everything past the prompt's own tokens zeroed.

``model_path`` is either an HF-layout umT5-XXL encoder, e.g. the ``text_encoder/`` folder of
Wan-AI/Wan2.2-TI2V-5B-Diffusers (``tokenizer_path``: its ``tokenizer/`` folder), or the official release's
``models_t5_umt5-xxl-enc-bf16.pth`` (``tokenizer_path``: the release's ``google/umt5-xxl/`` folder, the
default when it sits beside the .pth). The .pth holds Wan's own T5 module names; ``official_umt5_to_hf``
renames them onto transformers' UMT5EncoderModel, which computes the same encoder (relative-position buckets
per layer, gated-GELU FFN, RMS norms without mean). Nothing is downloaded; both paths must be local.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT_LENGTH = 512


def pad_text_embedding(embedding: torch.Tensor, length: int = TEXT_LENGTH) -> torch.Tensor:
    """[L, D] valid-token embeddings -> [length, D] with zeros after the prompt (Wan's convention)."""
    out = embedding.new_zeros(length, embedding.shape[-1])
    out[: min(length, embedding.shape[0])] = embedding[:length]
    return out


# Wan's T5 block names -> transformers' UMT5 names (per block i; the FFN's gate is wi_0, fc1 is wi_1).
_OFFICIAL_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
# Wan's umT5 buckets relative positions up to this distance (transformers' default too)
_MAX_DISTANCE = 128


def official_umt5_to_hf(state: dict) -> tuple[dict, dict]:
    """(transformers UMT5EncoderModel state dict, its config kwargs) from the release's .pth state dict."""
    if "token_embedding.weight" not in state or "norm.weight" not in state:
        raise KeyError("not a Wan umT5 encoder state dict: token_embedding.weight / norm.weight missing "
                       f"(first keys: {sorted(state)[:5]})")
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out = {"shared.weight": state["token_embedding.weight"], "encoder.final_layer_norm.weight": state["norm.weight"]}
    for i in range(layers):
        for src, dst in _OFFICIAL_BLOCK_KEYS.items():
            key = f"blocks.{i}.{src}"
            if key not in state:
                raise KeyError(f"Wan umT5 state dict lacks {key!r}")
            out[f"encoder.block.{i}.{dst}"] = state[key]
    vocab, d_model = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    config = {"vocab_size": vocab, "d_model": d_model, "d_kv": state["blocks.0.attn.q.weight"].shape[0] // heads,
              "d_ff": state["blocks.0.ffn.fc1.weight"].shape[0], "num_layers": layers, "num_heads": heads,
              "relative_attention_num_buckets": buckets, "relative_attention_max_distance": _MAX_DISTANCE,
              "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1}
    return out, config


def load_official_umt5(pth, dtype: torch.dtype = torch.bfloat16):
    """transformers' UMT5EncoderModel holding the weights of the release's models_t5_umt5-xxl-enc-bf16.pth."""
    from transformers import UMT5Config, UMT5EncoderModel

    pth = Path(pth)
    if not pth.is_file():
        raise FileNotFoundError(f"umT5 encoder weights not found: {pth}")
    state, config = official_umt5_to_hf(torch.load(pth, map_location="cpu", weights_only=True, mmap=True))
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**config))
    state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in transformers
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model


def official_umt5_state_dict(model) -> dict:
    """The inverse of ``official_umt5_to_hf``: a UMT5EncoderModel's weights under Wan's names (for tests and
    for writing a release-layout .pth)."""
    sd = model.state_dict()
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for i in range(model.config.num_layers):
        for src, dst in _OFFICIAL_BLOCK_KEYS.items():
            out[f"blocks.{i}.{src}"] = sd[f"encoder.block.{i}.{dst}"]
    return out


class UMT5TextEncoder:
    def __init__(self, model_path, tokenizer_path=None, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 max_length: int = TEXT_LENGTH):
        from transformers import AutoTokenizer, UMT5EncoderModel

        model_path = Path(model_path)
        if model_path.suffix == ".pth":
            tokenizer_path = tokenizer_path or model_path.parent / "google" / "umt5-xxl"
            self.model = load_official_umt5(model_path, dtype)
        else:
            self.model = UMT5EncoderModel.from_pretrained(str(model_path), dtype=dtype, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or model_path), local_files_only=True)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device, self.max_length = torch.device(device), max_length

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One [L_i, D] tensor per prompt (L_i = its token count, end-of-sequence included), on the CPU."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        return [hidden[i, :n].cpu() for i, n in enumerate(lengths)]


def save_tiny_umt5(path, words: list[str] | None = None, *, d_model: int = 32, seed: int = 0) -> Path:
    """Write a small random umT5 encoder and a word-level tokenizer to ``path`` (for tests and CPU smoke
    runs: the real umT5-XXL has d_model 4096). Returns ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    path = Path(path)
    words = words or ("a red disc and blue square move over striped floor clip robot picks up the cup "
                      "0 1 2 3 4 5 6 7 8 9").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(config).save_pretrained(path)
    return path
