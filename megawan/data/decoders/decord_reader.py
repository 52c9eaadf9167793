"""decord backend (CPU). Unmaintained since 2022 and known to leak memory on some files: kept for
comparison and for setups that already use it; the automatic choice prefers the other CPU backends."""

from __future__ import annotations

import torch

from megawan.data.bad_input import DECODE_ERROR, UNREADABLE_VIDEO, BadInputError
from megawan.data.decoders.base import VideoReader


def is_available() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


class DecordReader(VideoReader):
    """``get_batch`` seeks to the keyframe before each run of frames and decodes forward."""

    backend = "decord"

    def __init__(self, path: str, num_threads: int = 1):
        super().__init__(path)
        import decord

        try:
            self._reader = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=num_threads)
            self._num_frames = len(self._reader)
        except Exception as e:  # noqa: BLE001 - DECORDError and RuntimeError for bad files
            raise BadInputError(UNREADABLE_VIDEO, self.path, None, f"cannot open: {e}") from e

    def _read_sorted(self, indices: list[int]) -> torch.Tensor:
        try:
            return torch.from_numpy(self._reader.get_batch(indices).asnumpy())
        except Exception as e:  # noqa: BLE001
            raise BadInputError(DECODE_ERROR, self.path, indices[0], f"decode failed: {e}") from e

    def close(self) -> None:
        self._reader = None
