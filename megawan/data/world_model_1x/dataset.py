"""1X World Model raw v2.0 reader: clips of video [3, T, H, W] in [-1, 1] with their states [T, 25]."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from megawan.data.bad_input import (LENGTH_MISMATCH, NAN_STATES, SHORT_SEGMENT, UNREADABLE_VIDEO, BadInputError,
                                    BadInputPolicy, BadInputReport, load_with_replacement)
from megawan.data.clip_index import ClipIndex, check_clip_frames, clip_span, runs_to_index, valid_runs
from megawan.data.decoders import open_video, resolve_backend
from megawan.data.transforms import frames_to_video
from megawan.data.world_model_1x.layout import Shard1X, discover_shards

logger = logging.getLogger("megawan.data")

@dataclass
class WorldModel1XConfig:
    root: str  # a split folder: train_v2.0_raw (nested) or val_v2.0_raw (flat)
    clip_frames: int = 77  # 4n+1; 77 frames -> 20 latent frames (the challenge's window)
    frame_stride: int = 1  # take every k-th source frame (30 Hz / k)
    window_hop: int = 1  # frames between consecutive clip starts; 1 = every valid window
    size: tuple[int, int] | None = None  # (h, w) to resize + centre-crop to; None keeps 512x512
    backend: str = "auto"  # decoder: auto | pynvvideocodec | torchcodec | pyav | decord
    decode_threads: int = 1  # per reader; loader workers give the parallelism
    bad_input: BadInputPolicy = "skip"  # skip (name each file once + count) or raise
    max_retries: int = 8  # bad clips replaced in a row before giving up
    max_open_videos: int = 4  # readers kept open per worker (each holds an index of its shard)


def _probe_frame_count(path) -> int:
    """Frame count from the container header (cheap: no demuxing); raises for unreadable files."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        if stream.duration is not None and stream.average_rate:
            return int(round(float(stream.duration * stream.time_base * stream.average_rate)))
        return sum(1 for p in container.demux(stream) if p.pts is not None)


class WorldModel1XDataset(torch.utils.data.Dataset):
    """Map-style: item i is clip i of the ``ClipIndex`` (pair with ``DistributedClipSampler``).

    Checks made once at construction (reported and skipped or raised per ``bad_input``): unreadable
    video, frame counts of video / segment ids / states that disagree, segments shorter than one clip,
    NaN state rows. A clip that fails to decode is reported and replaced by another clip.
    """

    def __init__(self, config: WorldModel1XConfig, report: BadInputReport | None = None):
        """``report``: where bad input goes (e.g. one shared by the datasets of a trainer); by default this
        dataset's own, with ``config.bad_input`` as its policy."""
        check_clip_frames(config.clip_frames)
        if config.frame_stride < 1 or config.window_hop < 1:
            raise ValueError("frame_stride and window_hop must be >= 1")
        self.config = config
        self.report = report if report is not None else BadInputReport(config.bad_input)
        self.backend = resolve_backend(config.backend)
        self.span = clip_span(config.clip_frames, config.frame_stride)
        shards, self.hz = discover_shards(config.root)
        self.shards: list[Shard1X] = []
        self._states: list[np.ndarray] = []
        self._segments: list[np.ndarray] = []
        parts = []
        for shard in shards:
            checked = self._check_shard(shard)
            if checked is None:
                continue
            segment_ids, states, bad_rows = checked
            runs = valid_runs(segment_ids, bad_rows)
            parts.append(runs_to_index(len(self.shards), runs, self.span, config.window_hop))
            self.shards.append(shard)
            self._segments.append(segment_ids)
            self._states.append(states)
        self.index = ClipIndex.concatenate(parts, config.window_hop)
        if len(self.index) == 0:
            raise ValueError(f"no clip of {config.clip_frames} frames (stride {config.frame_stride}) fits in "
                             f"{config.root}; bad input seen: {dict(self.report.counts)}")
        self._readers: OrderedDict[int, object] = OrderedDict()
        self._readers_pid = os.getpid()

    def _check_shard(self, shard: Shard1X):
        try:
            video_frames = _probe_frame_count(shard.video)
        except Exception as e:  # noqa: BLE001 - any failure to open is an unreadable video
            self.report(BadInputError(UNREADABLE_VIDEO, shard.video, None, f"cannot open: {e}"))
            return None
        try:
            segment_ids = shard.load_segment_ids()
            states = shard.load_states()
        except (OSError, ValueError) as e:
            self.report(BadInputError(LENGTH_MISMATCH, shard.states, None, str(e)))
            return None
        lengths = {"video": video_frames, "segment ids": len(segment_ids), "states": len(states)}
        if shard.num_frames is not None:
            lengths["metadata"] = int(shard.num_frames)
        if len(set(lengths.values())) != 1:
            detail = ", ".join(f"{k} {v}" for k, v in lengths.items())
            self.report(BadInputError(LENGTH_MISMATCH, shard.states, min(lengths.values()),
                                      f"frame counts disagree ({detail}); shard skipped"))
            return None

        bad_rows = np.isnan(np.asarray(states)).any(axis=1)
        if bad_rows.any():
            starts = np.flatnonzero(np.diff(np.concatenate([[0], bad_rows.astype(np.int8)])) == 1)
            self.report(BadInputError(NAN_STATES, shard.states, int(starts[0]),
                                      f"{int(bad_rows.sum())} NaN state rows in {len(starts)} runs starting at "
                                      f"frames {starts[:8].tolist()}; clips over them are skipped"),
                        count=int(bad_rows.sum()))
        segment_runs = valid_runs(segment_ids)
        short = segment_runs[(segment_runs[:, 1] - segment_runs[:, 0]) < self.span]
        if len(short):
            self.report(BadInputError(SHORT_SEGMENT, shard.segments, int(short[0, 0]),
                                      f"{len(short)} segments shorter than a clip ({self.span} frames) starting "
                                      f"at frames {short[:8, 0].tolist()}; they yield no clips"),
                        count=len(short))
        return segment_ids, states, bad_rows

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self):  # open readers stay in the process that opened them
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()
        state.pop("_inherited_readers", None)
        return state

    def _reader(self, position: int):
        if self._readers_pid != os.getpid():
            # A forked loader worker inherited the parent's open readers, whose file offsets (and decoder
            # threads) belong to the parent: using one corrupts reads on both sides. Open this process's own.
            # The inherited ones are kept referenced, never used or closed: freeing a decoder here would
            # join threads that exist only in the parent.
            self._inherited_readers = self._readers
            self._readers, self._readers_pid = OrderedDict(), os.getpid()
        reader = self._readers.pop(position, None)
        if reader is None:
            reader = open_video(self.shards[position].video, self.backend, num_threads=self.config.decode_threads)
        self._readers[position] = reader  # most recently used last
        while len(self._readers) > self.config.max_open_videos:
            self._readers.popitem(last=False)[1].close()
        return reader

    def load_clip(self, clip: int) -> dict:
        position, first = self.index.locate(clip)
        frames_idx = first + self.config.frame_stride * np.arange(self.config.clip_frames)
        try:
            frames = self._reader(position).get_frames(frames_idx.tolist())
        except BadInputError:
            reader = self._readers.pop(position, None)  # its decoder state is suspect now
            if reader is not None:
                reader.close()
            raise
        shard = self.shards[position]
        return {
            "video": frames_to_video(frames, self.config.size),
            "states": torch.from_numpy(np.array(self._states[position][frames_idx], dtype=np.float32)),
            "shard": shard.index,
            "first_frame": first,
            "segment_id": int(self._segments[position][first]),
        }

    def __getitem__(self, clip: int) -> dict:
        return load_with_replacement(self.load_clip, clip, len(self), self.report, self.config.max_retries,
                                     what="clips")
