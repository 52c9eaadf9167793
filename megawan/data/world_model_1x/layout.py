"""Files of the 1X World Model raw v2.0 release: train keeps each kind in a sub-folder, val is flat.

    train_v2.0_raw/videos/video_{i}.mp4, segment_indices/segment_idx_{i}.bin (int32 [N]),
                   robot_states/states_{i}.bin (float32 [N, 25]), metadata/metadata_{i}.json, metadata.json
    val_v2.0_raw/video_{i}.mp4, segment_idx_{i}.bin, states_{i}.bin, metadata_{i}.json, metadata.json
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_STATES = 25
DEFAULT_HZ = 30

_SUBFOLDER = {"video": "videos", "segments": "segment_indices", "states": "robot_states", "metadata": "metadata"}
_PATTERN = {"video": "video_{}.mp4", "segments": "segment_idx_{}.bin", "states": "states_{}.bin",
            "metadata": "metadata_{}.json"}


@dataclass(frozen=True)
class Shard1X:
    """One shard's files. ``num_frames`` comes from its metadata json (``shard_num_frames``) when present."""

    index: int
    video: Path
    segments: Path
    states: Path
    metadata: Path | None
    num_frames: int | None

    def load_segment_ids(self) -> np.ndarray:
        return np.fromfile(self.segments, dtype=np.int32)

    def load_states(self) -> np.ndarray:
        """float32 [N, 25], memory-mapped: hour-long shards are read lazily, row by row."""
        size = self.states.stat().st_size
        rows = size // (4 * NUM_STATES)
        if rows * 4 * NUM_STATES != size:
            raise ValueError(f"{self.states}: {size} bytes is not a whole number of float32 [25] rows")
        return np.memmap(self.states, dtype=np.float32, mode="r", shape=(rows, NUM_STATES))


def _find(split_dir: Path, kind: str, index: int) -> Path:
    name = _PATTERN[kind].format(index)
    nested = split_dir / _SUBFOLDER[kind] / name
    return nested if nested.exists() else split_dir / name


def discover_shards(split_dir) -> tuple[list[Shard1X], float]:
    """The shards of one split (nested or flat layout) and the frame rate from ``metadata.json``."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"1X data folder {split_dir} does not exist (a split folder such as val_v2.0_raw)")
    videos = sorted(set(split_dir.glob("video_*.mp4")) | set(split_dir.glob("videos/video_*.mp4")))
    if not videos:
        raise FileNotFoundError(f"no video_*.mp4 under {split_dir} or {split_dir / 'videos'}")
    shards = []
    for video in videos:
        match = re.fullmatch(r"video_(\d+)\.mp4", video.name)
        if match is None:
            continue
        index = int(match.group(1))
        metadata = _find(split_dir, "metadata", index)
        num_frames = None
        if metadata.exists():
            num_frames = json.loads(metadata.read_text()).get("shard_num_frames")
        shards.append(Shard1X(index=index, video=video, segments=_find(split_dir, "segments", index),
                              states=_find(split_dir, "states", index),
                              metadata=metadata if metadata.exists() else None, num_frames=num_frames))
    shards.sort(key=lambda s: s.index)
    root_metadata = split_dir / "metadata.json"
    hz = json.loads(root_metadata.read_text()).get("hz", DEFAULT_HZ) if root_metadata.exists() else DEFAULT_HZ
    return shards, float(hz)
