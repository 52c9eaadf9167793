"""umT5 from the release's own .pth (Wan's T5 module names): same embeddings as a direct computation of Wan's
encoder from those weights, and as the HF-layout encoder holding the same weights."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from megawan.data.text_encoder import UMT5TextEncoder, official_umt5_state_dict, save_tiny_umt5

PROMPTS = ["a red disc and blue square move", "robot picks up the cup", ""]


def wan_t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int, max_dist: int = 128):
    """Wan's umT5 encoder written out from its state dict: per-layer bidirectional relative-position bias,
    unscaled attention, gated-GELU FFN (fc1(x) * gelu(gate(x))), RMS norms without mean, eps 1e-6."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    buckets = sd["blocks.0.pos_embedding.embedding.weight"].shape[0]
    length = ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    half = buckets // 2
    exact = half // 2
    far = exact + (torch.log(rel.abs().clamp(min=1).double() / exact) / math.log(max_dist / exact)
                   * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(rel.abs() < exact, rel.abs(), far.clamp(max=half - 1))
    x = sd["token_embedding.weight"][ids].double()
    b = x.shape[0]
    key_mask = torch.where(mask[:, None, None, :].bool(), 0.0, float("-inf")).double()
    for i in range(layers):
        w = {k[len(f"blocks.{i}."):]: v.double() for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = rms(x, w["norm1.weight"])
        q, k, v = ((h @ w[f"attn.{n}.weight"].T).view(b, length, heads, -1).transpose(1, 2) for n in "qkv")
        bias = w["pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]
        att = torch.softmax(q @ k.transpose(-1, -2) + bias + key_mask, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, length, -1) @ w["attn.o.weight"].T
        h = rms(x, w["norm2.weight"])
        x = x + ((h @ w["ffn.fc1.weight"].T) * F.gelu(h @ w["ffn.gate.0.weight"].T, approximate="tanh")) @ w["ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"].double())


@pytest.fixture(scope="module")
def release_t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    hf = save_tiny_umt5(root / "hf", d_model=32)
    enc = UMT5TextEncoder(hf, dtype=torch.float32)
    with torch.no_grad():  # transformers' init leaves some tensors tiny: randomise every weight
        for p in enc.model.parameters():
            p.normal_(0, 0.3)
    torch.save(official_umt5_state_dict(enc.model), root / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(hf, root / "google" / "umt5-xxl")
    return root, enc


def test_release_pth_encodes_like_wans_encoder(release_t5):
    root, _ = release_t5
    enc = UMT5TextEncoder(root / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)  # tokenizer found beside
    got = enc.encode(PROMPTS)
    tokens = enc.tokenizer(PROMPTS, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    sd = torch.load(root / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    ref = wan_t5_reference(sd, tokens.input_ids, tokens.attention_mask, heads=4)
    for i, g in enumerate(got):
        n = int(tokens.attention_mask[i].sum())
        assert g.shape == (n, 32)
        assert (g.double() - ref[i, :n]).abs().max().item() < 1e-4 * ref[i, :n].abs().max().item()


def test_release_pth_equals_hf_layout(release_t5):
    root, hf = release_t5
    enc = UMT5TextEncoder(root / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    for a, b in zip(enc.encode(PROMPTS), hf.encode(PROMPTS)):
        assert torch.equal(a, b)


def test_release_pth_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="umT5 encoder weights not found"):
        UMT5TextEncoder(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth", tmp_path)
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(KeyError, match="not a Wan umT5 encoder state dict"):
        UMT5TextEncoder(tmp_path / "x.pth", tmp_path)
