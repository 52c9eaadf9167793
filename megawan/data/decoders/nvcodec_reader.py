"""PyNvVideoCodec backend: NVDEC decode on the GPU, frames stay in device memory.

Needs the NVIDIA driver; the package installs without one but cannot be imported. Use it in the main
process or in loader workers started with the "spawn" context (CUDA cannot be used after fork).
NVDEC's YUV->RGB conversion is not FFmpeg's swscale, so pixels may differ from the CPU backends by a few
levels; the cross-backend test compares whichever backends are importable on the machine.
"""

from __future__ import annotations

import torch

from megawan.data.bad_input import DECODE_ERROR, UNREADABLE_VIDEO, BadInputError
from megawan.data.decoders.base import VideoReader


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import PyNvVideoCodec  # noqa: F401
    except Exception:  # noqa: BLE001 - fails with OSError/RuntimeError without the driver libraries
        return False
    return True


class NvCodecReader(VideoReader):
    """``SimpleDecoder.get_batch_frames_by_index`` seeks through the container index to the keyframes."""

    backend = "pynvvideocodec"

    def __init__(self, path: str, device: str | torch.device | None = None):
        super().__init__(path)
        import PyNvVideoCodec as nvc

        device = torch.device(device or "cuda")
        gpu_id = device.index if device.index is not None else torch.cuda.current_device()
        try:
            self._decoder = nvc.SimpleDecoder(self.path, gpu_id=gpu_id, use_device_memory=True,
                                              output_color_type=nvc.OutputColorType.RGB)
            self._num_frames = len(self._decoder)
        except Exception as e:  # noqa: BLE001
            raise BadInputError(UNREADABLE_VIDEO, self.path, None, f"cannot open: {e}") from e

    def _read_sorted(self, indices: list[int]) -> torch.Tensor:
        try:
            frames = self._decoder.get_batch_frames_by_index(indices)
            return torch.stack([torch.from_dlpack(f) for f in frames])  # [T, H, W, 3] uint8 on the GPU
        except Exception as e:  # noqa: BLE001
            raise BadInputError(DECODE_ERROR, self.path, indices[0], f"decode failed: {e}") from e

    def close(self) -> None:
        self._decoder = None
