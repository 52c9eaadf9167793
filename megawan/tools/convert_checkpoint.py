"""Convert a Wan DiT checkpoint between the official and the diffusers layouts.

    python -m megawan.tools.convert_checkpoint SRC DST [--to diffusers|official] [--dtype bf16|fp32]

Tensors are streamed one by one (memory holds at most one output shard); the source layout is
detected from its keys; DST is written atomically (a temporary directory renamed at the end).
"""

from __future__ import annotations

import argparse
import json

import torch

from megawan.checkpoint.dit_keys import LAYOUTS, detect_layout, to_layout, to_official
from megawan.checkpoint.safetensors_dir import SafetensorsDir, write_safetensors_dir
from megawan.models.dit_config import WanDiTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def convert(src, dst, to: str | None = None, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Convert ``src`` into ``dst``; return the target layout."""
    ckpt = SafetensorsDir(src)
    source = detect_layout(ckpt.keys())
    target = to or ("diffusers" if source == "official" else "official")
    if target not in LAYOUTS:
        raise ValueError(f"--to must be one of {LAYOUTS}, got {target!r}")
    config = WanDiTConfig.load(src)
    cast = DTYPES[dtype] if dtype else None

    def tensors():
        for key in ckpt.keys():
            t = ckpt.read(key)
            yield to_layout(to_official(key, source), target), (t.to(cast) if cast else t)

    config_json = config.to_official() if target == "official" else config.to_diffusers()
    write_safetensors_dir(tensors(), dst, extra_files={"config.json": config_json}, max_shard_bytes=max_shard_bytes)
    return target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint directory (safetensors shards + config.json)")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--to", choices=LAYOUTS, help="target layout (default: the other one)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast tensors (default: keep)")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    args = p.parse_args(argv)
    target = convert(args.src, args.dst, args.to, args.dtype, int(args.max_shard_gb * 2**30))
    print(json.dumps({"src": args.src, "dst": args.dst, "layout": target}))


if __name__ == "__main__":
    main()
