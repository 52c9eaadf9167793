"""Parameter names of the Wan 2.2 VAE: megawan's own, the release's (``Wan2.2_VAE.pth``) and diffusers'
(``AutoencoderKLWan``). One table of (megawan, external) name fragments per layout and residual-block
count (``megawan.checkpoint.renames``, the DiT's style); loading walks megawan's parameters, so a missing
or misshapen tensor is reported by the name the file uses.
"""

from __future__ import annotations

import functools

import torch

from megawan.checkpoint.renames import rename

LAYOUTS = ("official", "diffusers")
NUM_STAGES = 4

# A residual block's layers: (megawan, release) where the release numbers its nn.Sequential.
_RESIDUAL_OFFICIAL = [("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
                      ("conv2.", "residual.6."), ("shortcut.", "shortcut.")]
_RESIDUAL_DIFFUSERS = [("shortcut.", "conv_shortcut."), ("", "")]  # ("", ""): the rest of the block keeps its names


@functools.lru_cache(maxsize=None)
def _table(layout: str, num_res_blocks: int) -> tuple[tuple[str, str], ...]:
    """(megawan, ``layout``) fragments for every parameter of a VAE38 with ``num_res_blocks``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    official = layout == "official"
    rows = [("quant_conv.", "conv1." if official else "quant_conv."),
            ("post_quant_conv.", "conv2." if official else "post_quant_conv.")]
    residual = _RESIDUAL_OFFICIAL if official else _RESIDUAL_DIFFUSERS
    # The decoder's stages hold one more residual block; the resample follows the blocks.
    for part, blocks in (("encoder", num_res_blocks), ("decoder", num_res_blocks + 1)):
        enc = part == "encoder"
        if official:
            stage = f"{part}.{'downsamples' if enc else 'upsamples'}.{{s}}.{'downsamples' if enc else 'upsamples'}."
            mid, attn = f"{part}.middle.{{i2}}.", f"{part}.middle.1."
            resample = stage + f"{blocks}.resample.1.", stage + f"{blocks}.time_conv."
            rows += [(f"{part}.conv_in.", f"{part}.conv1."), (f"{part}.norm_out.", f"{part}.head.0."),
                     (f"{part}.conv_out.", f"{part}.head.2.")]
        else:
            stage = f"{part}.{'down_blocks' if enc else 'up_blocks'}.{{s}}."
            mid, attn = f"{part}.mid_block.resnets.{{i}}.", f"{part}.mid_block.attentions.0."
            sampler = stage + ("downsampler." if enc else "upsampler.")
            resample = sampler + "resample.1.", sampler + "time_conv."
            rows += [(f"{part}.{name}.", f"{part}.{name}.") for name in ("conv_in", "norm_out", "conv_out")]
        rows.append((f"{part}.mid.attn.", attn))
        rows += [(f"{part}.mid.resnets.{i}.{a}", mid.format(i=i, i2=2 * i) + b) for i in range(2) for a, b in residual]
        for s in range(NUM_STAGES):
            theirs = stage.format(s=s)
            block = theirs if official else theirs + "resnets."
            rows += [(f"{part}.stages.{s}.resnets.{j}.{a}", f"{block}{j}.{b}") for j in range(blocks)
                     for a, b in residual]
            rows += [(f"{part}.stages.{s}.resample.conv.", resample[0].format(s=s)),
                     (f"{part}.stages.{s}.resample.time_conv.", resample[1].format(s=s))]
    return tuple(rows)


def external_name(key: str, layout: str, num_res_blocks: int) -> str:
    """The name megawan parameter ``key`` has in a ``layout`` checkpoint."""
    name = rename(key, _table(layout, num_res_blocks))
    if name is None:
        raise KeyError(f"no {layout} name for VAE parameter {key}")
    return name


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
