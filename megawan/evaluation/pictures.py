"""Pictures a person reads at a glance: the labelled rollout contact sheet and the training curves, as PNG.

Drawn with Pillow (already a dependency; its bundled font needs Pillow >= 10.1) rather than adding matplotlib
for two simple figures.

    rollout_sheet(rows, row_labels, col_labels)     tiles upscaled (nearest) so 64 x 64 frames are visible
    training_curves(metrics_jsonl, out_png)         loss + validation, rollout PSNR, latent MSE against steps
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def rollout_sheet(rows: list[list[torch.Tensor]], row_labels: list[str], col_labels: list[str],
                  min_tile: int = 192, gap: int = 6) -> torch.Tensor:
    """uint8 [H', W', 3]: a grid of uint8 [h, w, 3] tiles, each upscaled by nearest neighbour to at least
    ``min_tile`` pixels a side, a label at the left of every row and above every column."""
    from PIL import Image, ImageDraw

    if not rows or not rows[0] or len(rows) != len(row_labels) or len(rows[0]) != len(col_labels):
        raise ValueError(f"{len(rows)} rows x {len(rows[0]) if rows else 0} columns need as many row and column "
                         f"labels, got {len(row_labels)} and {len(col_labels)}")
    h, w = rows[0][0].shape[:2]
    scale = max(1, math.ceil(min_tile / max(h, w)))
    th, tw = h * scale, w * scale
    font = _font(max(12, th // 12))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(int(probe.textlength(t, font=font)) for t in row_labels) + 2 * gap
    line = font.size + 4
    top = max(len(c.split("\n")) for c in col_labels) * line + gap
    cols = len(col_labels)
    sheet = Image.new("RGB", (left + cols * (tw + gap), top + len(rows) * (th + gap)), WHITE)
    draw = ImageDraw.Draw(sheet)
    for j, text in enumerate(col_labels):
        for k, part in enumerate(text.split("\n")):
            x = left + j * (tw + gap) + (tw - probe.textlength(part, font=font)) / 2
            draw.text((x, gap // 2 + k * line), part, fill=BLACK, font=font)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (th + gap)
        draw.text((gap, y + th / 2 - font.size / 2), label, fill=BLACK, font=font)
        for j, img in enumerate(row):
            if tuple(img.shape[:2]) != (h, w):
                raise ValueError(f"sheet tiles must share one size, got {tuple(img.shape)} and {(h, w)}")
            tile = Image.fromarray(np.ascontiguousarray(img.numpy())).resize((tw, th), Image.NEAREST)
            sheet.paste(tile, (left + j * (tw + gap), y))
    return torch.from_numpy(np.asarray(sheet).copy())


# ---- curves ------------------------------------------------------------------------------------------
def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _panel(draw, box, title: str, series: list[tuple[str, list[tuple[float, float]], tuple]], font, small,
           x_range: tuple[float, float]) -> None:
    """One line chart inside ``box`` (x0, y0, x1, y1): title, axes with ticks, one polyline per series, legend."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill=BLACK, font=font)
    plot = (x0 + 60, y0 + font.size + 10, x1 - 10, y1 - 40)
    px0, py0, px1, py1 = plot
    values = [v for _, pts, _ in series for _, v in pts if math.isfinite(v)]
    draw.rectangle(plot, outline=BLACK)
    if not values:
        draw.text((px0 + 10, py0 + 10), "no data", fill=GREY, font=small)
        return
    yt = _nice_ticks(min(values), max(values))
    ylo, yhi = yt[0], yt[-1]
    xt = _nice_ticks(*x_range)
    xlo, xhi = x_range[0], max(x_range[1], x_range[0] + 1)

    def to_px(x, y):
        return (px0 + (x - xlo) / (xhi - xlo) * (px1 - px0), py1 - (y - ylo) / (yhi - ylo) * (py1 - py0))

    for t in yt:
        _, y = to_px(xlo, t)
        draw.line((px0 - 4, y, px0, y), fill=BLACK)
        draw.line((px0, y, px1, y), fill=(230, 230, 230))
        draw.text((x0, y - small.size / 2), f"{t:.4g}", fill=BLACK, font=small)
    for t in xt:
        if t < xlo or t > xhi:
            continue
        x, _ = to_px(t, ylo)
        draw.line((x, py1, x, py1 + 4), fill=BLACK)
        draw.text((x - 8, py1 + 6), f"{t:.0f}", fill=BLACK, font=small)
    draw.text((px1 - 30, py1 + 20), "step", fill=BLACK, font=small)
    lx = px0 + 8
    for name, pts, colour in series:
        pts = [to_px(x, v) for x, v in pts if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) <= 12 else ():
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.line((lx, py0 + 10, lx + 18, py0 + 10), fill=colour, width=3)
        draw.text((lx + 22, py0 + 10 - small.size / 2), name, fill=colour, font=small)
        lx += 30 + draw.textlength(name, font=small)


def read_metrics(path) -> list[dict]:
    """The records of a run's metrics.jsonl (the last record of each (kind, step) wins: a resumed run
    re-logs steps after its checkpoint)."""
    records = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r.get("kind"), r.get("step"))] = r
    return [records[k] for k in sorted(records, key=lambda k: (str(k[0]), k[1] or 0))]


def training_curves(metrics_jsonl, out_png, title: str = "") -> Path:
    """Write the run's curves as one PNG: (1) training loss (and its running mean) with the validation loss,
    (2) rollout PSNR of the last frame: the model with true / zeroed / swapped states and the copy-last-frame
    baseline, (3) rollout latent MSE against the copy-last-latent baseline. Returns the path."""
    from PIL import Image, ImageDraw

    records = read_metrics(metrics_jsonl)

    def points(kind, key):
        return [(r["step"], float(r[key])) for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]

    train = points("train", "loss")
    smooth, window = [], max(1, len(train) // 20)
    for i in range(len(train)):
        chunk = train[max(0, i - window + 1): i + 1]
        smooth.append((train[i][0], sum(v for _, v in chunk) / len(chunk)))
    steps = [s for s, _ in train] + [r["step"] for r in records if r.get("step") is not None]
    x_range = (0.0, float(max(steps) if steps else 1))
    panels = [
        ("loss (flow matching)", [("train", train, (180, 200, 230)), ("train, running mean", smooth, COLOURS[0]),
                                  ("validation", points("validation", "loss"), COLOURS[1])]),
        ("rollout PSNR of the last frame (dB)", [
            ("true states", points("rollout", "psnr_last"), COLOURS[0]),
            ("states zeroed", points("rollout", "zeroed_psnr_last"), COLOURS[4]),
            ("states swapped", points("rollout", "swapped_psnr_last"), COLOURS[5]),
            ("copy last frame", points("rollout", "baseline_psnr_last"), COLOURS[3])]),
        ("rollout latent MSE, predicted frames", [
            ("true states", points("rollout", "latent_mse_mean"), COLOURS[0]),
            ("copy last latent", points("rollout", "baseline_latent_mse_mean"), COLOURS[3])]),
    ]
    width, height = 900, 300
    font, small = _font(16), _font(12)
    head = 30 if title else 0
    img = Image.new("RGB", (width, head + height * len(panels)), WHITE)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((10, 6), title, fill=BLACK, font=font)
    for i, (name, series) in enumerate(panels):
        _panel(draw, (10, head + i * height + 8, width - 10, head + (i + 1) * height - 4), name, series, font, small,
               x_range)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def write_training_curves(run_dir, title: str = "") -> str | None:
    """``<run>/curves.png`` from ``<run>/logs/metrics.jsonl`` (None when the run logged nothing); a failure to
    draw is reported, never fatal to the run that asked for it."""
    import logging

    run_dir = Path(run_dir)
    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        return None
    try:
        return str(training_curves(metrics, run_dir / "curves.png", title=title))
    except Exception as e:  # noqa: BLE001 - the run's checkpoints matter more than its picture
        logging.getLogger("megawan.train").warning("could not draw %s: %s", run_dir / "curves.png", e)
        return None
