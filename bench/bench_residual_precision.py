"""Error of the DiT's precision options against the fp32 model (the release's numerics at full precision).

Same weights (the tiny preset's widths, random initialisation, seed 0), same input (a 3 x 6 x 8 latent
grid = 36 tokens, per-token timesteps), forward only: the relative L2 error of the output with bf16 GEMMs and

* the fp32 residual stream (the release's numerics, the default), and
* the bf16 residual stream (``DiTRuntime(residual_dtype=torch.bfloat16)``, the faster option;
  diffusers' ``WanTransformer3DModel`` in bf16 runs so),

at several depths, since rounding the stream at every residual add accumulates over blocks. Runs on
CPU (and on a GPU if that is where the ranks are); random weights, so a trained model's figures may
differ. Speed of the option: ``bench_dit_block_gpu.py --modes compiled compiled-bf16-stream``.

    python bench/bench_residual_precision.py --layers 2 10 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._table import format_table  # noqa: E402

from megawan.models.dit import DiTRuntime, WanDiT, WanDiTConfig  # noqa: E402
from tests.dit_fixtures import make_case, rel_err  # noqa: E402


def errors(layers: int) -> dict:
    tiny = WanDiTConfig.preset("tiny")
    cfg = WanDiTConfig(dim=tiny.dim, ffn_dim=tiny.ffn_dim, num_heads=tiny.num_heads, num_layers=layers,
                       text_dim=tiny.text_dim)
    torch.manual_seed(0)
    ref = WanDiT(cfg, runtime=DiTRuntime(linear_impl="local")).eval()
    weights = ref.state_dict()
    case = make_case(3, 6, 8, per_token=True)
    out = {}
    with torch.no_grad():
        base = ref(*case)
        for stream in (torch.float32, torch.bfloat16):
            model = WanDiT(cfg, runtime=DiTRuntime(dtype=torch.bfloat16, residual_dtype=stream, linear_impl="local",
                                                   init_weights=False)).eval()
            model.load_state_dict(weights)
            out[stream] = rel_err(model(*case).float(), base)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 10, 30])
    args = p.parse_args(argv)
    tiny = WanDiTConfig.preset("tiny")
    print(f"tiny widths (dim {tiny.dim}, {tiny.num_heads} heads, ffn {tiny.ffn_dim}), 36 tokens, random "
          f"weights (seed 0); rel. L2 error of the output against the fp32 model\n")
    rows = []
    for layers in args.layers:
        e = errors(layers)
        rows.append([layers, f"{e[torch.float32]:.2e}", f"{e[torch.bfloat16]:.2e}",
                     f"{e[torch.bfloat16] / e[torch.float32]:.1f}x"])
    print(format_table(rows, ["blocks", "bf16 GEMMs, fp32 stream (default)", "bf16 GEMMs, bf16 stream",
                              "ratio"]))


if __name__ == "__main__":
    main()
