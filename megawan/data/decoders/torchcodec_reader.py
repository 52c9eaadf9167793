"""torchcodec backend (FFmpeg through the system libraries; CPU or CUDA decode)."""

from __future__ import annotations

import torch

from megawan.data.bad_input import DECODE_ERROR, UNREADABLE_VIDEO, BadInputError
from megawan.data.decoders.base import VideoReader


def is_available() -> bool:
    try:  # import fails (not only ImportError) when the FFmpeg shared libraries are missing
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


class TorchCodecReader(VideoReader):
    """``seek_mode="exact"`` scans the file once at open, so indices are exact and seeks land on keyframes;
    ``get_frames_at`` decodes each frame once and never seeks backwards within a call."""

    backend = "torchcodec"

    def __init__(self, path: str, num_threads: int = 1, device: str | torch.device | None = None):
        super().__init__(path)
        from torchcodec.decoders import VideoDecoder

        try:
            self._decoder = VideoDecoder(self.path, seek_mode="exact", num_ffmpeg_threads=num_threads,
                                         dimension_order="NHWC", device=device or "cpu")
            self._num_frames = int(self._decoder.metadata.num_frames)
        except Exception as e:  # noqa: BLE001 - torchcodec raises RuntimeError/ValueError for bad files
            raise BadInputError(UNREADABLE_VIDEO, self.path, None, f"cannot open: {e}") from e

    def _read_sorted(self, indices: list[int]) -> torch.Tensor:
        try:
            return self._decoder.get_frames_at(indices).data
        except Exception as e:  # noqa: BLE001
            raise BadInputError(DECODE_ERROR, self.path, indices[0], f"decode failed: {e}") from e

    def close(self) -> None:
        self._decoder = None
