"""The training curve as a PNG, drawn with Pillow (no plotting library is a dependency)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PANEL_W, PANEL_H, MARGIN = 420, 260, 40


def _smooth(values: list[float], window: int = 25) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def _panel(draw: ImageDraw.ImageDraw, left: int, title: str, values: list[float]) -> None:
    y = np.log10(np.maximum(_smooth(values), 1e-8))
    lo, hi = float(y.min()), float(y.max()) + 1e-9
    box = (left + MARGIN, MARGIN, left + PANEL_W - 10, PANEL_H - MARGIN)
    draw.rectangle(box, outline=(0, 0, 0))
    xs = box[0] + (box[2] - box[0]) * np.arange(len(y)) / max(1, len(y) - 1)
    ys = box[3] - (box[3] - box[1]) * (y - lo) / (hi - lo)
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
    draw.text((box[0], 12), f"{title} (log10 loss, {len(values)} steps)", fill=(0, 0, 0))
    draw.text((left + 2, box[1]), f"{10 ** hi:.3g}", fill=(0, 0, 0))
    draw.text((left + 2, box[3] - 10), f"{10 ** lo:.3g}", fill=(0, 0, 0))
    draw.text((box[0], box[3] + 8), "step 0", fill=(0, 0, 0))
    draw.text((box[2] - 60, box[3] + 8), f"step {len(values)}", fill=(0, 0, 0))


def write_curve(path: Path, curves: dict[str, list[float]]) -> None:
    """One panel per named loss curve (smoothed over 25 steps), written atomically to `path`."""
    image = Image.new("RGB", (PANEL_W * len(curves), PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, values) in enumerate(curves.items()):
        _panel(draw, i * PANEL_W, title, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
