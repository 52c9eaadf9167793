"""Folders of captioned videos: ``captions.jsonl`` ({"video": relative path, "caption": text} per line) or
``captions.csv`` (columns video, caption). Clips are resized to cover the target size with the aspect
ratio kept, then centre-cropped."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch.utils.data

from megawan.data.bad_input import (SHORT_VIDEO, BadInputError, BadInputPolicy, BadInputReport,
                                    load_with_replacement)
from megawan.data.clip_index import check_clip_frames, clip_span
from megawan.data.decoders import open_video, resolve_backend
from megawan.data.transforms import frames_to_video


@dataclass
class CaptionedFolderConfig:
    root: str
    size: tuple[int, int] = (704, 1280)  # (h, w); TI2V-5B's native 720p-class size
    clip_frames: int = 121  # 4n+1
    frame_stride: int = 1
    clip_start: Literal["start", "center"] = "start"  # where in each video the clip is taken
    captions_file: str | None = None  # default: captions.jsonl, else captions.csv
    backend: str = "auto"
    decode_threads: int = 1
    bad_input: BadInputPolicy = "skip"
    max_retries: int = 8


def read_captions(path: Path) -> list[tuple[str, str]]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"captions must be .jsonl or .csv, got {path}")
    try:
        return [(str(r["video"]), str(r["caption"])) for r in rows]
    except KeyError as e:
        raise ValueError(f"{path}: every row needs 'video' and 'caption' fields") from e


class CaptionedVideoFolder(torch.utils.data.Dataset):
    """Item i: a clip of video i with its caption. A video too short for a clip or failing to decode is
    reported and replaced by the next one (policy "skip") or raises (policy "raise")."""

    def __init__(self, config: CaptionedFolderConfig, report: BadInputReport | None = None):
        check_clip_frames(config.clip_frames)
        self.config = config
        self.root = Path(config.root)
        captions = (self.root / config.captions_file if config.captions_file else
                    next((p for p in (self.root / "captions.jsonl", self.root / "captions.csv") if p.exists()), None))
        if captions is None:
            raise FileNotFoundError(f"no captions.jsonl or captions.csv in {self.root}")
        self.items = read_captions(captions)
        if not self.items:
            raise ValueError(f"{captions} lists no videos")
        self.backend = resolve_backend(config.backend)
        self.report = report if report is not None else BadInputReport(config.bad_input)
        self.span = clip_span(config.clip_frames, config.frame_stride)

    def __len__(self) -> int:
        return len(self.items)

    def load_clip(self, index: int) -> dict:
        relative, caption = self.items[index]
        path = self.root / relative
        with open_video(path, self.backend, num_threads=self.config.decode_threads) as reader:
            if reader.num_frames < self.span:
                raise BadInputError(SHORT_VIDEO, path, reader.num_frames,
                                    f"{reader.num_frames} frames, a clip needs {self.span}")
            first = 0 if self.config.clip_start == "start" else (reader.num_frames - self.span) // 2
            frames = reader.get_frames((first + self.config.frame_stride * np.arange(self.config.clip_frames)).tolist())
        return {"video": frames_to_video(frames, tuple(self.config.size)), "caption": caption, "index": index,
                "first_frame": first}

    def __getitem__(self, index: int) -> dict:
        return load_with_replacement(self.load_clip, index, len(self), self.report, self.config.max_retries,
                                     what="videos")
