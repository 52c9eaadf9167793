"""PyAV (bundled FFmpeg) backend: CPU decode with an exact frame index built by demuxing once."""

from __future__ import annotations

import numpy as np
import torch

from megawan.data.bad_input import DECODE_ERROR, UNREADABLE_VIDEO, BadInputError
from megawan.data.decoders.base import VideoReader


def is_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class PyAVReader(VideoReader):
    """Seeks to the keyframe at or before a wanted frame and decodes forward, keeping the decoder's
    position between calls so that consecutive windows of one shard continue instead of re-seeking.

    Opening demuxes the file once (packets only, no decoding) to map presentation timestamps to frame
    indices and to find the keyframes; this stays correct with B-frames and variable frame timing.
    """

    backend = "pyav"

    def __init__(self, path: str, num_threads: int = 1):
        super().__init__(path)
        import av

        self._av = av
        try:
            self._container = av.open(self.path)
            self._stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError) as e:
            raise BadInputError(UNREADABLE_VIDEO, self.path, None, f"cannot open: {e}") from e
        ctx = self._stream.codec_context
        ctx.thread_count = num_threads
        ctx.thread_type = "AUTO" if num_threads > 1 else "SLICE"
        self._build_index()
        self._frames = None  # decoder iterator, valid after a seek
        self._last = -1  # index of the last frame the iterator produced
        self.decoded_frames = 0  # frames decoded so far, kept to show random access stays cheap

    def _build_index(self) -> None:
        pts, keyframe = [], []
        try:
            for packet in self._container.demux(self._stream):
                if packet.pts is not None:
                    pts.append(packet.pts)
                    keyframe.append(packet.is_keyframe)
        except self._av.error.FFmpegError as e:
            raise BadInputError(UNREADABLE_VIDEO, self.path, len(pts), f"demux failed: {e}") from e
        if not pts:
            raise BadInputError(UNREADABLE_VIDEO, self.path, None, "no video packets")
        order = np.argsort(pts, kind="stable")
        self._pts = np.asarray(pts, dtype=np.int64)[order]
        self._keyframes = np.flatnonzero(np.asarray(keyframe)[order])
        if self._keyframes.size == 0 or self._keyframes[0] != 0:
            self._keyframes = np.concatenate([[0], self._keyframes])
        self._num_frames = int(self._pts.size)

    def _seek(self, index: int) -> None:
        key = int(self._keyframes[np.searchsorted(self._keyframes, index, side="right") - 1])
        self._container.seek(int(self._pts[key]), stream=self._stream, backward=True, any_frame=False)
        self._frames = self._container.decode(self._stream)
        self._last = key - 1

    def _must_seek(self, index: int) -> bool:
        """Seek when behind the decoder, or when a keyframe lies between its position and ``index``."""
        if self._frames is None or index <= self._last:
            return True
        next_key = np.searchsorted(self._keyframes, self._last, side="right")
        return next_key < self._keyframes.size and self._keyframes[next_key] <= index

    def _read_sorted(self, indices: list[int]) -> torch.Tensor:
        out = []
        for target in indices:
            if self._must_seek(target):
                self._seek(target)
            try:
                while self._last < target:
                    frame = next(self._frames)
                    self.decoded_frames += 1
                    if frame.pts is None:
                        continue
                    index = int(np.searchsorted(self._pts, frame.pts))
                    if index >= self._pts.size or self._pts[index] != frame.pts:
                        continue  # a frame the demuxer did not list: ignore it
                    self._last = index
                    if index == target:
                        # one swscale thread: a threaded conversion in the parent hangs forked loader workers
                        out.append(frame.to_ndarray(format="rgb24", threads=1))
            except StopIteration:
                self._frames = None
                raise BadInputError(DECODE_ERROR, self.path, target, "stream ended before this frame") from None
            except self._av.error.FFmpegError as e:
                self._frames = None
                raise BadInputError(DECODE_ERROR, self.path, target, f"decode failed: {e}") from e
            if self._last > target:  # the decoder skipped the wanted frame (damaged data)
                self._frames = None
                raise BadInputError(DECODE_ERROR, self.path, target, "frame missing from the decoded stream")
        return torch.from_numpy(np.stack(out))

    def close(self) -> None:
        self._frames = None
        self._container.close()
