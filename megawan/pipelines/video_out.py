"""Streamed, sharded VAE decode to mp4 (PyAV) and PNG contact sheets.

``decode_frames`` runs ``WanVAE38.iter_decode`` with each rank of the VAE group decoding its own spatial tile,
and assembles one frame group at a time (1 frame, then 4): no rank ever holds the whole video. Rank 0 of the
group encodes each group into the mp4 as it arrives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megawan.vae.model import SPATIAL_FACTOR, plan_partition


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[3, n, H, W] in [-1, 1] -> uint8 [n, H, W, 3]."""
    x = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


def decode_frames(vae, latents: torch.Tensor, group=None, frames_per_step: int = 1):
    """Yield the full frames [3, n, H, W] (float, [-1, 1]) of one sample's latents [1, C, F, h, w], a frame group
    at a time, on every rank of ``group``; each rank decodes only its tile."""
    if latents.shape[0] != 1:
        raise ValueError(f"decode one sample at a time, got a batch of {latents.shape[0]}")
    part = plan_partition(latents.shape, group, factor=1, device=latents.device)
    for tile in vae.iter_decode(latents, group, frames_per_step=frames_per_step):
        yield part.gather_tiles(tile, SPATIAL_FACTOR)[0]


class Mp4Writer:
    """H.264 (yuv420p) mp4 written frame by frame; ``write`` takes uint8 [n, H, W, 3]."""

    def __init__(self, path, fps: float, codec: str = "libx264", crf: int = 18):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        self.fps, self.codec, self.crf = fps, codec, crf
        self.stream = None
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        import av
        from fractions import Fraction

        arr = frames.numpy() if torch.is_tensor(frames) else np.asarray(frames)
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
            self.stream.height, self.stream.width = arr.shape[1], arr.shape[2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.codec_context.time_base = Fraction(1) / self.stream.codec_context.framerate
            if self.codec == "libx264":
                self.stream.options = {"crf": str(self.crf)}
        for frame in arr:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts = self.frames  # in units of 1/fps: the stream's time base
            vf.time_base = self.stream.codec_context.time_base
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def contact_sheet(rows: list[list[torch.Tensor]], gap: int = 4) -> torch.Tensor:
    """A grid of uint8 [H, W, 3] images (rows of equal-size tiles) -> uint8 [H', W', 3] on a white ground."""
    if not rows or not rows[0]:
        raise ValueError("contact_sheet needs at least one image")
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    sheet = torch.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            if img.shape[:2] != (h, w):
                raise ValueError(f"contact sheet tiles must share one size, got {tuple(img.shape)} and {(h, w)}")
            sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = img
    return sheet


def save_png(path, image: torch.Tensor) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.numpy()).save(path)
    return path


def sheet_indices(num_frames: int, count: int = 8) -> list[int]:
    """``count`` frame indices spread evenly over the video, first and last included."""
    count = max(1, min(count, num_frames))
    return sorted({round(i * (num_frames - 1) / max(1, count - 1)) for i in range(count)})


def write_video(vae, latents: torch.Tensor, path, group=None, *, fps: float = 24.0, sheet_frames: int = 8,
                frames_per_step: int = 1, progress: bool = False) -> dict:
    """Decode one sample's latents [1, C, F, h, w] over ``group`` into ``path`` (.mp4) and a contact sheet
    beside it (.png, ``sheet_frames`` frames). Every rank of the group must call it; rank 0 writes."""
    from megawan.pipelines.sampling import Progress

    total = 4 * (latents.shape[2] - 1) + 1
    bar = Progress(total, "decode", every=max(1, total // 10), enabled=progress)
    keep = set(sheet_indices(total, sheet_frames))
    writer = Mp4Writer(path, fps) if _is_writer(group) else None
    picked, start = [], 0
    try:
        for frames in decode_frames(vae, latents, group, frames_per_step):
            img = to_uint8(frames)
            if writer is not None:
                writer.write(img)
            picked += [img[i - start] for i in range(start, start + img.shape[0]) if i in keep]
            start += img.shape[0]
            bar.update(start)
    finally:
        if writer is not None:
            writer.close()
    sheet_path = Path(path).with_suffix(".png")
    if writer is not None:
        save_png(sheet_path, contact_sheet([picked]))
    return {"video": str(path), "contact_sheet": str(sheet_path), "frames": start,
            "height": int(picked[0].shape[0]), "width": int(picked[0].shape[1])}


def _is_writer(group) -> bool:
    if not dist.is_initialized():
        return True
    return dist.get_rank(group) == 0 if group is not None else dist.get_rank() == 0
