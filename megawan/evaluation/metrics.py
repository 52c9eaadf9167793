"""Image metrics of the 1X challenge and its usual companions: PSNR and SSIM on 8-bit RGB frames.

Frames are uint8 [..., H, W, 3] (what a video file holds); both metrics use a data range of 255. SSIM is the
Wang et al. (2004) index with an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, computed per
channel over the windows that fit inside the image and averaged over windows and channels (scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
channel_axis=-1)`` defines the same number).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGE = 255.0
_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # scikit-image's truncate 3.5 at sigma 1.5: int(3.5 * 1.5 + 0.5)
_K1, _K2 = 0.01, 0.03


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """[..., H, W, 3] -> float64 [N, 3, H, W]."""
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3] RGB, got {tuple(x.shape)}")
    return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).double()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame, [...] for uint8 frames [..., H, W, 3] (inf where the frames are identical)."""
    if pred.shape != target.shape:
        raise ValueError(f"frames differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = (_as_images(pred) - _as_images(target)).square().flatten(1).mean(1)
    return (10 * torch.log10(DATA_RANGE**2 / mse)).reshape(pred.shape[:-3])


def _gaussian_window(device) -> torch.Tensor:
    r = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(r**2) / (2 * _SSIM_SIGMA**2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per frame, [...] for uint8 frames [..., H, W, 3] (each side >= 11 px)."""
    if pred.shape != target.shape:
        raise ValueError(f"frames differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if min(pred.shape[-3:-1]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * _SSIM_RADIUS + 1} px a side, got {tuple(pred.shape)}")
    x, y = _as_images(pred), _as_images(target)
    g = _gaussian_window(x.device)
    c = x.shape[1]
    wh = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    ww = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(t):  # separable Gaussian, "valid" windows only
        return F.conv2d(F.conv2d(t, wh, groups=c), ww, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (_K1 * DATA_RANGE) ** 2, (_K2 * DATA_RANGE) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).reshape(pred.shape[:-3])


def finite_mean(values) -> float:
    """Mean of finite values (identical frames give PSNR = inf; they are left out, as is common); nan if none."""
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")
