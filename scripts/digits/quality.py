"""The quality oracle: a classifier fit on held-out digits scores generated ones; and the 10 x 8 sample grid.

Torch-free: works on any pipeline object with Diffusers' `__call__` (diffrt's runtime or diffusers itself).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from digits import data

SEEDS = tuple(range(8))


def fit_oracle() -> Any:
    """An RBF SVC fit on the held-out digits after the same 8 -> 32 -> 8 resampling generated images get."""
    from sklearn.svm import SVC

    _, (ink, labels) = data.load_split()
    rgb01 = (data.to_images(ink).transpose(0, 2, 3, 1) + 1.0) / 2.0
    return SVC(gamma="scale", C=10.0).fit(data.to_ink(rgb01), labels)


def generate(pipe: Any, seeds: tuple[int, ...] = SEEDS, prompts_per_call: int = 2, **call: Any) -> np.ndarray:
    """Images [10, len(seeds), H, W, 3] in [0, 1]: one prompt per digit, one image per seed.

    Prompts are batched `prompts_per_call` at a time (exported packages cap the UNet batch, CFG doubles it);
    prompt i's image j uses seed j, so every image is reproducible alone with `generator=seed`.
    """
    rows = []
    for first in range(0, 10, prompts_per_call):
        prompts = [data.prompt(label) for label in range(first, min(10, first + prompts_per_call))]
        out = pipe(prompts, num_images_per_prompt=len(seeds), generator=list(seeds) * len(prompts),
                   output_type="np", **call)
        rows.append(np.asarray(out.images))
    images = np.concatenate(rows)
    return images.reshape(10, len(seeds), *images.shape[1:])


def accuracy(oracle: Any, images: np.ndarray) -> float:
    """Share of generated images [10, S, H, W, 3] that the oracle labels with the digit that was asked for."""
    labels = np.repeat(np.arange(10), images.shape[1])
    predicted = oracle.predict(data.to_ink(images.reshape(-1, *images.shape[2:])))
    return float((predicted == labels).mean())


def grid(images: np.ndarray, scale: int = 2, gap: int = 2) -> np.ndarray:
    """A uint8 RGB grid: one row per digit, one column per seed, white gaps, nearest upscaling."""
    rows, cols, h, w, _ = images.shape
    cell_h, cell_w = h * scale + gap, w * scale + gap
    canvas = np.full((rows * cell_h + gap, cols * cell_w + gap, 3), 255, dtype=np.uint8)
    pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=2).repeat(scale, axis=3)
    for r in range(rows):
        for c in range(cols):
            y, x = gap + r * cell_h, gap + c * cell_w
            canvas[y : y + h * scale, x : x + w * scale] = pixels[r, c]
    return canvas
