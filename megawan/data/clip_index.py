"""Where clips may start: windows of ``clip_frames`` (4n+1) frames taken every ``frame_stride`` frames,
never across a segment change (a cut between unrelated recordings) and never over a NaN state row.

The index is stored as runs (shard, first start, count) rather than one entry per clip, so the ~10M
windows of the full 1X train split cost a few MB; ``locate`` maps a flat clip number to (shard, frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def check_clip_frames(clip_frames: int) -> None:
    if clip_frames < 1 or (clip_frames - 1) % 4 != 0:
        raise ValueError(f"clip_frames must be 4n+1 (the VAE compresses time 4x after the first frame), "
                         f"got {clip_frames}")


def clip_span(clip_frames: int, frame_stride: int) -> int:
    """Source frames covered by one clip, first to last inclusive."""
    return (clip_frames - 1) * frame_stride + 1


def valid_runs(segment_ids: np.ndarray, bad_rows: np.ndarray | None = None) -> np.ndarray:
    """[R, 2] (start, stop) of maximal frame runs with one segment id and no bad row."""
    n = segment_ids.shape[0]
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(segment_ids[1:] != segment_ids[:-1]) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [n]])
    runs = np.stack([starts, stops], axis=1)
    if bad_rows is None or not bad_rows.any():
        return runs
    pieces = []
    for start, stop in runs:  # split runs at bad rows
        good = ~bad_rows[start:stop]
        edges = np.flatnonzero(np.diff(np.concatenate([[False], good, [False]]).astype(np.int8)))
        pieces.extend((start + a, start + b) for a, b in edges.reshape(-1, 2))
    return np.asarray(pieces, dtype=np.int64).reshape(-1, 2)


@dataclass
class ClipIndex:
    """Clip numbers 0..len-1 over all shards, in (shard, frame) order."""

    shard: np.ndarray  # [R] shard position (into the dataset's shard list) of each run
    first: np.ndarray  # [R] first start frame of each run
    count: np.ndarray  # [R] clips in each run
    hop: int

    @classmethod
    def empty(cls, hop: int) -> "ClipIndex":
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, hop)

    def __post_init__(self):
        self._ends = np.cumsum(self.count)

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends.size else 0

    def locate(self, clip: int) -> tuple[int, int]:
        """(shard position, first frame) of clip number ``clip``."""
        if not 0 <= clip < len(self):
            raise IndexError(f"clip {clip} out of range [0, {len(self)})")
        run = int(np.searchsorted(self._ends, clip, side="right"))
        before = int(self._ends[run - 1]) if run else 0
        return int(self.shard[run]), int(self.first[run] + (clip - before) * self.hop)

    @staticmethod
    def concatenate(parts: list["ClipIndex"], hop: int) -> "ClipIndex":
        if not parts:
            return ClipIndex.empty(hop)
        return ClipIndex(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("shard", "first", "count")),
                         hop=hop)


def runs_to_index(shard_position: int, runs: np.ndarray, span: int, hop: int) -> ClipIndex:
    """Clips starting at run_start, run_start + hop, ... whose span fits inside each run."""
    room = runs[:, 1] - runs[:, 0] - span  # last valid start offset
    keep = room >= 0
    count = room[keep] // hop + 1
    return ClipIndex(np.full(count.shape, shard_position, dtype=np.int64), runs[keep, 0].astype(np.int64),
                     count.astype(np.int64), hop)
