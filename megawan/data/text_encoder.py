"""umT5 text embeddings the way Wan uses them: tokens up to 512, the encoder's last hidden state, and
everything past the prompt's own tokens zeroed.

A real run points ``model_path`` at an HF-layout umT5-XXL encoder, e.g. the ``text_encoder/`` folder of
Wan-AI/Wan2.2-TI2V-5B-Diffusers, and ``tokenizer_path`` at its ``tokenizer/`` folder (google/umt5-xxl's
tokenizer). The official ``models_t5_umt5-xxl-enc-bf16.pth`` of the non-diffusers release is not read: only
the HF layout is supported. Nothing is downloaded; both paths must be local.
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


class UMT5TextEncoder:
    def __init__(self, model_path, tokenizer_path=None, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                 max_length: int = TEXT_LENGTH):
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or model_path), local_files_only=True)
        self.model = UMT5EncoderModel.from_pretrained(str(model_path), dtype=dtype, local_files_only=True)
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
