"""The interface every video decoder backend implements."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from megawan.data.bad_input import DECODE_ERROR, BadInputError


class VideoReader(abc.ABC):
    """Random access to the frames of one video file by frame index (presentation order).

    ``get_frames`` returns uint8 RGB frames [T, H, W, 3] in the order asked for. Backends seek to the
    keyframe at or before a requested frame and decode forward from there, never from the start of the
    file, so a window in the middle of an hour-long shard costs at most one GOP of extra decoding.
    """

    backend: str = ""

    def __init__(self, path: str):
        self.path = str(path)
        self._num_frames = 0  # set by the backend when it opens the file

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @abc.abstractmethod
    def _read_sorted(self, indices: list[int]) -> torch.Tensor:
        """Frames at strictly increasing, in-range ``indices`` as uint8 [T, H, W, 3]."""

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError("no frame indices requested")
        bad = [i for i in indices if not 0 <= i < self.num_frames]
        if bad:
            raise BadInputError(DECODE_ERROR, self.path, bad[0],
                                f"frame index out of range (video has {self.num_frames} frames)")
        unique = sorted(set(indices))
        frames = self._read_sorted(unique)
        if frames.shape[0] != len(unique):
            raise BadInputError(DECODE_ERROR, self.path, unique[min(frames.shape[0], len(unique) - 1)],
                                f"decoder returned {frames.shape[0]} of {len(unique)} frames")
        if unique == indices:
            return frames
        position = {frame: k for k, frame in enumerate(unique)}
        return frames[torch.tensor([position[i] for i in indices])]

    def close(self) -> None:
        """Release the file and decoder state."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
