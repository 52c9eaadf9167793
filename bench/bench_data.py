"""Data pipeline throughput: decode + resize of random-access windows per backend, and cached latents.

    python bench/bench_data.py [--frames 300] [--windows 12] [--window 17] [--size 256]

Decode: one 512x512 H.264 video (30 Hz, keyframe every 32 frames, B-frames) made by make_sample_data's
renderer; each backend reads --windows windows of --window consecutive frames at random starts through
megawan's reader (seek to the keyframe, decode forward) and resizes them to --size with frames_to_video.
One thread for torch and for the decoder, so the figure is frames/s per core.
Cache: a latent cache of TI2V-5B-sized world-model samples (latents [48, 20, 32, 32] bf16, states, shared
empty-prompt embedding [512, 4096]), read through LatentCacheDataset in random order.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megawan.data.decoders import available_backends, open_video
from megawan.data.latent_cache import EMPTY_PROMPT, LatentCacheDataset, save_tensors_atomic, shard_name, write_index
from megawan.data.transforms import frames_to_video
from megawan.tools.make_sample_data import make_shard, render_frame, write_video


def bench_decode(path: Path, num_frames: int, windows: int, window: int, size: int) -> dict:
    rng = np.random.default_rng(0)
    starts = rng.integers(0, num_frames - window, windows).tolist()
    results = {}
    for backend in available_backends():
        reader = open_video(path, backend, num_threads=1)  # open (and index) once, as a loader worker does
        frames_to_video(reader.get_frames(range(window)), (size, size))  # warm-up
        start = time.perf_counter()
        for s in starts:
            frames_to_video(reader.get_frames(range(s, s + window)), (size, size))
        elapsed = time.perf_counter() - start
        reader.close()
        results[backend] = windows * window / elapsed
    return results


def bench_cache(root: Path, samples: int, per_shard: int) -> float:
    for k in range(samples // per_shard):
        save_tensors_atomic(root / shard_name(k), {
            "latents": torch.randn(per_shard, 48, 20, 32, 32).bfloat16(),
            "states": torch.randn(per_shard, 77, 25),
            "shard": torch.zeros(per_shard, dtype=torch.int64),
            "first_frame": torch.arange(per_shard, dtype=torch.int64),
        })
    save_tensors_atomic(root / EMPTY_PROMPT, {"text_embeds": torch.randn(1, 4096).bfloat16()})
    write_index(root, samples // per_shard, "shared")
    cache = LatentCacheDataset(root)
    order = np.random.default_rng(0).permutation(len(cache)).tolist()
    start = time.perf_counter()
    for i in order:
        cache[i]
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--window", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cache-samples", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, states, backgrounds = make_shard(a.frames, 0, 0, 30, 150)
        write_video(tmp / "video.mp4", (render_frame(states[i], backgrounds[i], 512) for i in range(a.frames)),
                    gop=32)
        decode = bench_decode(tmp / "video.mp4", a.frames, a.windows, a.window, a.size)
        cache = bench_cache(tmp / "cache", a.cache_samples, 16)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"decode + resize 512->{a.size}, {a.windows} random windows of {a.window} frames, 1 thread:")
    for backend, fps in decode.items():
        print(f"  {backend:12s} {fps:8.1f} frames/s per core")
    print(f"cached latents [48, 20, 32, 32] bf16 + states + shared text, random order: {cache:.1f} samples/s")


if __name__ == "__main__":
    main()
