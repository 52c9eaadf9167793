"""Frame tensors from decoders (uint8 [T, H, W, 3]) to model input (float [3, T, H, W] in [-1, 1])."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale float frames [T, 3, H, W] so they cover ``size`` (h, w) with the aspect ratio kept, then crop
    the centre. Downscaling is antialiased so that small training sizes do not alias."""
    height, width = frames.shape[-2:]
    target_h, target_w = size
    if (height, width) == (target_h, target_w):
        return frames
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    if (new_h, new_w) != (height, width):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=scale < 1)
    top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return frames[..., top:top + target_h, left:left + target_w]


def frames_to_video(frames: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, h, w] in [-1, 1], resized and centre-cropped to ``size``."""
    video = frames.permute(0, 3, 1, 2).float()
    if size is not None:
        video = resize_center_crop(video, size).clamp_(0, 255)
    return (video / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()
