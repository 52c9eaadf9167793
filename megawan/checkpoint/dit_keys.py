"""Parameter names of the Wan DiT in its three spellings: megawan's, the official release's, diffusers'.

megawan names its modules like the official release except the FFN (``ffn.fc1`` / ``ffn.fc2``
for the release's ``ffn.0`` / ``ffn.2``) and the fused self-attention projection (``self_attn.qkv``,
rows [q; k; v], three release tensors). official <-> diffusers is one table of name fragments
(``megawan.checkpoint.renames``), read in either direction.
"""

from __future__ import annotations

import re

from megawan.checkpoint.renames import rename

LAYOUTS = ("official", "diffusers")

# (official, diffusers) for names outside the blocks
_TOP_LEVEL = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    # megawan's world-model state conditioning (no release has it; the diffusers spelling is megawan's)
    ("state_embedding.", "condition_embedder.state_embedder."),
]
NEW_IN_MEGAWAN = "state_embedding."  # official prefix of parameters a released checkpoint lacks
# (official, diffusers) for names inside "blocks.N."
_IN_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("norm3.", "norm2."),  # the affine LayerNorm before cross-attention
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
] + [
    (f"{official}.{a}.", f"{diffusers}.{b}.")
    for official, diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2"))
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                 ("norm_q", "norm_q"), ("norm_k", "norm_k"))
]
_MEGAWAN_FFN = [("ffn.0.", "ffn.fc1."), ("ffn.2.", "ffn.fc2.")]  # (official, megawan) inside blocks
# megawan's fused parameters inside blocks -> the release tensors concatenated along dim 0
FUSED = {"self_attn.qkv.": ("self_attn.q.", "self_attn.k.", "self_attn.v.")}

_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _rename(key: str, table, src: int) -> str:
    """Rename ``key`` by ``table`` read from column ``src`` to the other column."""
    prefix, name = "", key
    m = _BLOCK.match(key)
    if m:
        prefix, name = m.groups()
    new = rename(name, table if m else _TOP_LEVEL, src)
    return key if new is None else prefix + new


def official_keys(name: str) -> tuple[str, ...]:
    """The release's key(s) of megawan parameter ``name``: several for a fused parameter."""
    m = _BLOCK.match(name)
    if not m:
        return (name,)
    prefix, rest = m.groups()
    for fused, parts in FUSED.items():
        if rest.startswith(fused):
            return tuple(prefix + part + rest[len(fused):] for part in parts)
    return (_rename(name, _MEGAWAN_FFN, src=1),)


def official_to_diffusers(key: str) -> str:
    return _rename(key, _IN_BLOCK, src=0)


def diffusers_to_official(key: str) -> str:
    return _rename(key, _IN_BLOCK, src=1)


def to_layout(official_key: str, layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return official_key if layout == "official" else official_to_diffusers(official_key)


def to_official(key: str, layout: str) -> str:
    return key if layout == "official" else diffusers_to_official(key)


def detect_layout(keys) -> str:
    """'diffusers' if the keys use diffusers' names (condition_embedder, attn1, ...), else 'official'."""
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    return "official"
