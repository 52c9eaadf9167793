"""Write a small synthetic dataset in the exact 1X World Model raw v2.0 layout (plus a captioned folder).

    python -m megawan.tools.make_sample_data --out data/sample_1x

    data/sample_1x/
      train_v2.0_raw/metadata.json                 {"num_shards", "hz", "num_images", "query"}
      train_v2.0_raw/videos/video_{i}.mp4          H.264, --size square (default 256; 1X is 512), 30 Hz,
                                                   a keyframe every --gop frames, B-frames
      train_v2.0_raw/segment_indices/segment_idx_{i}.bin   int32 [N]
      train_v2.0_raw/robot_states/states_{i}.bin   float32 [N, 25]
      train_v2.0_raw/metadata/metadata_{i}.json    {"shard_num_frames", "shard_ind", "hz"}
      val_v2.0_raw/{video_0.mp4, segment_idx_0.bin, states_0.bin, metadata_0.json, metadata.json}  (flat)
      captioned/{clip_k.mp4, captions.jsonl}       for the captioned-folder dataset

Each shard is a run of segments (1-5 s clips) with fresh smooth state trajectories per segment. Every
frame is a pure function of that frame's 25 states and of its segment's background (``render_frame``), so
a model can learn how states drive the picture:

  neck pitch (20)           -> horizon height            angular velocity (24) -> horizon tilt
  hip yaw (0)               -> floor stripe phase        linear velocity (23)  -> floor stripe contrast
  left shoulder yaw/pitch (8, 6)   -> red disc x / y     left elbow pitch (9)  -> its brightness
  left hand closure (21)           -> disc radius (closed = half the open radius)
  right shoulder yaw/pitch (15, 13)-> blue square x / y  right elbow pitch (16) -> its brightness
  right hand closure (22)          -> square size (closed = half the open size)
Joint values stay in [-1, 1] rad, closures in [0, 1], velocities in [-1, 1]. Segment ids are unique and
increase across shards, so a cut shows as a change of id, of background and of the state trajectories.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from megawan.data.world_model_1x.layout import DEFAULT_HZ, NUM_STATES


def write_video(path, frames, fps: int = DEFAULT_HZ, gop: int = 32, crf: int = 18, faststart: bool = False) -> None:
    """Encode uint8 RGB frames (iterable of [H, W, 3]) as H.264 yuv420p mp4 with a fixed keyframe interval
    and B-frames (so decoders must reorder), the way camera footage is usually stored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = None
        for index, image in enumerate(frames):
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = Fraction(1, fps)
                stream.options = {"crf": str(crf), "preset": "veryfast", "g": str(gop),
                                  "keyint_min": str(gop), "sc_threshold": "0", "bf": "2"}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def segment_lengths(rng: np.random.Generator, num_frames: int, min_len: int, max_len: int) -> list[int]:
    lengths = []
    while sum(lengths) < num_frames:
        lengths.append(int(rng.integers(min_len, max_len + 1)))
    lengths[-1] -= sum(lengths) - num_frames
    if len(lengths) > 1 and lengths[-1] < min_len:  # no cut-off tail shorter than a segment may be
        tail = lengths.pop()
        lengths[-1] += tail
    return lengths


def segment_states(rng: np.random.Generator, length: int) -> np.ndarray:
    """Smooth trajectories: per dimension a sum of two slow sinusoids (0.1-0.6 Hz) with random phases."""
    t = np.arange(length, dtype=np.float64)[:, None] / DEFAULT_HZ
    freq = rng.uniform(0.1, 0.6, (2, NUM_STATES))
    phase = rng.uniform(0, 2 * np.pi, (2, NUM_STATES))
    amp = rng.uniform(0.2, 0.5, (2, NUM_STATES))
    states = (amp[0] * np.sin(2 * np.pi * freq[0] * t + phase[0])
              + amp[1] * np.sin(2 * np.pi * freq[1] * t + phase[1]))
    states = np.clip(states, -1, 1)
    states[:, 21:23] = 0.5 + 0.5 * states[:, 21:23]  # hand closures in [0, 1]
    return states.astype(np.float32)


def segment_background(rng: np.random.Generator) -> np.ndarray:
    """Sky colour, floor colour and stripe colour of one segment, float32 [3, 3] in [0, 255]."""
    return rng.uniform(30, 225, (3, 3)).astype(np.float32)


def _blend(image: np.ndarray, alpha_fn, centre: tuple[float, float], reach: float, colour: np.ndarray) -> None:
    """Blend ``colour`` into ``image`` in place with coverage ``alpha_fn(xs, ys)``, evaluated only in the
    bounding box of radius ``reach`` (normalised units) around ``centre``: rendering stays cheap."""
    size = image.shape[0]
    x0 = max(0, int((centre[0] - reach) * size) - 2)
    x1 = min(size, int((centre[0] + reach) * size) + 3)
    y0 = max(0, int((centre[1] - reach) * size) - 2)
    y1 = min(size, int((centre[1] + reach) * size) + 3)
    if x0 >= x1 or y0 >= y1:
        return
    xs = (np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5) / size
    ys = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5) / size
    alpha = alpha_fn(xs, ys)[..., None]
    patch = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = np.clip(patch * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def render_frame(states: np.ndarray, background: np.ndarray, size: int) -> np.ndarray:
    """One uint8 [size, size, 3] frame from one row of 25 states (mapping in the module docstring)."""
    states = states.astype(np.float32)
    xs = (np.arange(size, dtype=np.float32) + 0.5) / size
    sky, floor, stripe = background
    horizon = 0.5 + 0.25 * states[20] + 0.15 * states[24] * (xs - 0.5)  # per column
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (8 * xs + 2 * states[0]))
    contrast = 0.3 + 0.5 * abs(states[23])
    floor_row = np.clip(floor + (stripe - floor) * (contrast * stripes)[:, None] + 0.5, 0, 255).astype(np.uint8)
    sky_px = np.clip(sky + 0.5, 0, 255).astype(np.uint8)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = floor_row[None]
    sky_rows = np.clip(np.ceil(horizon * size - 0.5).astype(np.int64), 0, size)  # rows above the horizon
    for x in range(size):  # column slices: much faster than a broadcast np.where over the frame
        image[:sky_rows[x], x] = sky_px

    # Soft 1.5-pixel edges keep the codec's ringing small.
    def soft(inside):
        return np.clip(inside * size / 1.5 + 0.5, 0, 1)

    # Left hand: red disc.
    cx, cy = 0.3 + 0.15 * states[8], 0.6 - 0.2 * states[6]
    radius = 0.12 * (1 - 0.5 * states[21])
    _blend(image, lambda x, y: soft(radius - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)), (cx, cy), radius,
           np.array([200 + 55 * states[9], 40, 40], dtype=np.float32))
    # Right hand: blue square.
    cx, cy = 0.7 + 0.15 * states[15], 0.6 - 0.2 * states[13]
    half = 0.1 * (1 - 0.5 * states[22])
    _blend(image, lambda x, y: soft(np.minimum(half - np.abs(x - cx), half - np.abs(y - cy))), (cx, cy), half,
           np.array([40, 60, 200 + 55 * states[16]], dtype=np.float32))
    return image


def render_clip(rng: np.random.Generator, num_frames: int, size: int = 256) -> np.ndarray:
    """A fresh clip of the sample world: one segment's states and background, uint8 [num_frames, size, size, 3]
    (what a shard's video holds before H.264; used to fit the tiny VAE on unlimited clips)."""
    states, background = segment_states(rng, num_frames), segment_background(rng)
    return np.stack([render_frame(states[i], background, size) for i in range(num_frames)])


def make_shard(num_frames: int, first_segment_id: int, seed: int, min_seg: int, max_seg: int):
    """Segment ids [N] int32, states [N, 25] float32 and per-frame backgrounds for one shard."""
    rng = np.random.default_rng(seed)
    lengths = segment_lengths(rng, num_frames, min_seg, max_seg)
    segment_ids = np.repeat(np.arange(first_segment_id, first_segment_id + len(lengths), dtype=np.int32), lengths)
    states = np.concatenate([segment_states(rng, n) for n in lengths])
    backgrounds = [segment_background(rng) for _ in lengths]
    frame_background = np.repeat(np.arange(len(lengths)), lengths)
    return segment_ids, states, [backgrounds[k] for k in frame_background]


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def write_shard(split_dir: str, shard: int, flat: bool, num_frames: int, size: int, gop: int,
                first_segment_id: int, seed: int, min_seg: int, max_seg: int) -> int:
    """Write one shard's four files; returns the number of segments."""
    split_dir = Path(split_dir)
    segment_ids, states, backgrounds = make_shard(num_frames, first_segment_id, seed, min_seg, max_seg)
    sub = (lambda name: split_dir) if flat else (lambda name: split_dir / name)
    write_video(sub("videos") / f"video_{shard}.mp4",
                (render_frame(states[i], backgrounds[i], size) for i in range(num_frames)), gop=gop)
    sub("segment_indices").mkdir(parents=True, exist_ok=True)
    segment_ids.tofile(sub("segment_indices") / f"segment_idx_{shard}.bin")
    sub("robot_states").mkdir(parents=True, exist_ok=True)
    states.tofile(sub("robot_states") / f"states_{shard}.bin")
    _write_json(sub("metadata") / f"metadata_{shard}.json",
                {"shard_num_frames": num_frames, "shard_ind": shard, "hz": DEFAULT_HZ})
    return int(np.unique(segment_ids).size)


def write_captioned_folder(out_dir, num_videos: int = 4, num_frames: int = 33, seed: int = 0) -> None:
    """Short clips of assorted aspect ratios (rendered like the 1X shards) and a captions.jsonl."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    shapes = [(96, 160), (160, 96), (128, 128), (72, 128)]
    records = []
    for k in range(num_videos):
        height, width = shapes[k % len(shapes)]
        states = segment_states(rng, num_frames)
        background = segment_background(rng)
        side = max(height, width)
        frames = (render_frame(states[i], background, side)[(side - height) // 2:(side + height) // 2,
                                                            (side - width) // 2:(side + width) // 2]
                  for i in range(num_frames))
        write_video(out_dir / f"clip_{k}.mp4", frames, gop=16)
        records.append({"video": f"clip_{k}.mp4",
                        "caption": f"a red disc and a blue square move over a striped floor, clip {k}"})
    (out_dir / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_sample_data(out, *, train_shards: int = 3, val_shards: int = 1, frames_per_shard: int = 240,
                     size: int = 256, gop: int = 32, min_segment: int = 30, max_segment: int = 150,
                     captioned_videos: int = 4, seed: int = 0, workers: int | None = None) -> Path:
    out = Path(out)
    jobs = []
    next_segment_id = 0
    for split, num_shards, flat in (("train_v2.0_raw", train_shards, False), ("val_v2.0_raw", val_shards, True)):
        for shard in range(num_shards):
            jobs.append(dict(split_dir=str(out / split), shard=shard, flat=flat, num_frames=frames_per_shard,
                             size=size, gop=gop, first_segment_id=next_segment_id,
                             seed=seed * 1000 + len(jobs), min_seg=min_segment, max_seg=max_segment))
            next_segment_id += frames_per_shard  # an upper bound on segments per shard keeps ids unique
        _write_json(out / split / "metadata.json",
                    {"num_shards": num_shards, "hz": DEFAULT_HZ, "num_images": num_shards * frames_per_shard,
                     "query": "synthetic sample data (megawan.tools.make_sample_data)"})
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    # spawn, not fork: a forked copy of a busy parent (pytest, torch threads) can crash in CPython 3.11
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_run_job, jobs))
    if captioned_videos:
        write_captioned_folder(out / "captioned", num_videos=captioned_videos, seed=seed)
    return out


def _run_job(job: dict) -> int:
    return write_shard(**job)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--train-shards", type=int, default=3)
    p.add_argument("--val-shards", type=int, default=1)
    p.add_argument("--frames-per-shard", type=int, default=240)
    p.add_argument("--size", type=int, default=256, help="frame height and width (the real 1X data: 512)")
    p.add_argument("--gop", type=int, default=32, help="keyframe interval in frames")
    p.add_argument("--min-segment", type=int, default=30)
    p.add_argument("--max-segment", type=int, default=150)
    p.add_argument("--captioned-videos", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    start = time.perf_counter()
    out = make_sample_data(a.out, train_shards=a.train_shards, val_shards=a.val_shards,
                           frames_per_shard=a.frames_per_shard, size=a.size, gop=a.gop,
                           min_segment=a.min_segment, max_segment=a.max_segment,
                           captioned_videos=a.captioned_videos, seed=a.seed, workers=a.workers)
    print(f"wrote {a.train_shards}+{a.val_shards} shards of {a.frames_per_shard} frames at {a.size}x{a.size} "
          f"to {out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
