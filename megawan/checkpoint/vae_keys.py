"""Parameter names of the Wan 2.2 VAE: megawan's own, the release's (``Wan2.2_VAE.pth``) and diffusers'
(``AutoencoderKLWan``). One rename table per layout maps a megawan name to its external name; loading
walks megawan's parameters, so a missing or misshapen tensor is reported by the name the file uses.
"""

from __future__ import annotations

import re

import torch

LAYOUTS = ("official", "diffusers")

_RESIDUAL_OFFICIAL = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                      "conv2": "residual.6", "shortcut": "shortcut"}
_HEAD_OFFICIAL = {"norm_out.gamma": "head.0.gamma", "conv_out": "head.2"}


def _official_name(key: str, num_res_blocks: int) -> str:
    if key.startswith("quant_conv."):
        return "conv1." + key.split(".", 1)[1]
    if key.startswith("post_quant_conv."):
        return "conv2." + key.split(".", 1)[1]
    part, rest = key.split(".", 1)  # encoder | decoder
    stages = "downsamples" if part == "encoder" else "upsamples"
    resample_index = num_res_blocks if part == "encoder" else num_res_blocks + 1

    def residual(tail: str) -> str:
        for ours, theirs in _RESIDUAL_OFFICIAL.items():
            if tail.startswith(ours):
                return theirs + tail[len(ours):]
        raise KeyError(key)

    if rest.startswith("conv_in."):
        return f"{part}.conv1.{rest[len('conv_in.'):]}"
    for ours, theirs in _HEAD_OFFICIAL.items():
        if rest.startswith(ours):
            return f"{part}.{theirs}{rest[len(ours):]}"
    if m := re.fullmatch(r"mid\.resnets\.(\d)\.(.+)", rest):
        return f"{part}.middle.{2 * int(m[1])}.{residual(m[2])}"
    if m := re.fullmatch(r"mid\.attn\.(.+)", rest):
        return f"{part}.middle.1.{m[1]}"
    if m := re.fullmatch(r"stages\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.{stages}.{m[1]}.{stages}.{m[2]}.{residual(m[3])}"
    if m := re.fullmatch(r"stages\.(\d+)\.resample\.conv\.(.+)", rest):
        return f"{part}.{stages}.{m[1]}.{stages}.{resample_index}.resample.1.{m[2]}"
    if m := re.fullmatch(r"stages\.(\d+)\.resample\.time_conv\.(.+)", rest):
        return f"{part}.{stages}.{m[1]}.{stages}.{resample_index}.time_conv.{m[2]}"
    raise KeyError(f"no official name for {key}")


def _diffusers_name(key: str) -> str:
    part = key.split(".", 1)[0]
    key = re.sub(r"\.stages\.", ".down_blocks." if part == "encoder" else ".up_blocks.", key)
    key = key.replace(".resample.conv.", (".downsampler" if part == "encoder" else ".upsampler") + ".resample.1.")
    key = key.replace(".resample.time_conv.", (".downsampler" if part == "encoder" else ".upsampler") + ".time_conv.")
    key = key.replace(".shortcut.", ".conv_shortcut.")
    key = key.replace(".mid.resnets.", ".mid_block.resnets.").replace(".mid.attn.", ".mid_block.attentions.0.")
    return key


def external_name(key: str, layout: str, num_res_blocks: int) -> str:
    if layout == "official":
        return _official_name(key, num_res_blocks)
    if layout == "diffusers":
        return _diffusers_name(key)
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def detect_layout(state_dict: dict) -> str:
    if "encoder.conv1.weight" in state_dict or "decoder.conv1.weight" in state_dict:
        return "official"
    if "encoder.conv_in.weight" in state_dict or "decoder.conv_in.weight" in state_dict:
        return "diffusers"
    sample = ", ".join(list(state_dict)[:5])
    raise ValueError(f"not a Wan 2.2 VAE state dict (neither encoder.conv1.weight nor encoder.conv_in.weight "
                     f"present; first keys: {sample})")


def to_internal(state_dict: dict, expected: dict[str, torch.Size], layout: str, num_res_blocks: int) -> dict:
    """Rename an external state dict to megawan names, checking every tensor is present and well shaped."""
    out, used = {}, set()
    for key, shape in expected.items():
        name = external_name(key, layout, num_res_blocks)
        if name not in state_dict:
            raise KeyError(f"checkpoint ({layout} layout) lacks {name!r} (megawan parameter {key}, shape "
                           f"{tuple(shape)})")
        tensor = state_dict[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                             f"(does the config match the checkpoint?)")
        out[key] = tensor
        used.add(name)
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        raise ValueError(f"checkpoint ({layout} layout) has {len(unexpected)} tensors this VAE does not use, e.g. "
                         f"{unexpected[:5]} (wrong config or not a Wan 2.2 VAE)")
    return out


def to_external(state_dict: dict, layout: str, num_res_blocks: int) -> dict:
    return {external_name(k, layout, num_res_blocks): v for k, v in state_dict.items()}
