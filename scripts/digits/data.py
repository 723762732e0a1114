"""The scikit-learn digits as 32x32 dark-ink-on-white RGB images, their captions, and the way back to 8x8.

Torch-free, so the quality oracle in `tests/test_digits.py` uses exactly the same pixel mapping as training.
"""
from __future__ import annotations

import numpy as np

SIZE = 32  # training resolution; the VAE (factor 4) turns it into 8x8x4 latents
FACTOR = SIZE // 8
HELD_OUT = 0.33  # share of the digits kept away from training, for the quality oracle's classifier
SPLIT_SEED = 0
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}", "the digit {n}", "number {word}", "a {word}", "{n}", "the number {word}",
    "handwritten digit {n}", "a drawing of the digit {word}",
)


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of half-pixel-centred bilinear resizing (torch `align_corners=False`)."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = centres - low
    matrix = np.zeros((size_out, size_in))
    matrix[np.arange(size_out), low] += 1 - frac
    matrix[np.arange(size_out), high] += frac
    return matrix


UPSAMPLE = _bilinear_matrix(8, SIZE)


def to_images(ink: np.ndarray) -> np.ndarray:
    """Digits ink [N, 8, 8] in 0..16 -> float32 images [N, 3, 32, 32] in [-1, 1], dark ink on white paper."""
    big = np.einsum("ij,njk,lk->nil", UPSAMPLE, ink / 16.0, UPSAMPLE)
    gray = 1.0 - 2.0 * np.clip(big, 0.0, 1.0)
    return np.repeat(gray[:, None], 3, axis=1).astype(np.float32)


def to_ink(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] (a pipeline's `output_type="np"`) -> 8x8 ink features [N, 64] in 0..16.

    Area-averages 4x4 blocks of the gray image; the classifier is fit on held-out digits sent through
    `to_images` and back, so generated and real digits pass the same resampling.
    """
    gray = np.asarray(images, dtype=np.float64).mean(axis=-1)
    n, h, w = gray.shape
    blocks = gray.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return ((1.0 - blocks) * 16.0).reshape(n, 64)


def load_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train ink [N, 8, 8], labels), (held-out ink, labels)): a fixed stratified split of the 1,797 digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=HELD_OUT, stratify=digits.target, random_state=SPLIT_SEED)
    return (x_train, y_train), (x_test, y_test)


def stroke_words(ink: np.ndarray) -> list[str]:
    """"bold" / "thin" for the heaviest / lightest third of each digit's strokes (by total ink), else ""."""
    mass = ink.reshape(len(ink), -1).sum(axis=1)
    low, high = np.quantile(mass, [1 / 3, 2 / 3])
    return ["bold" if m > high else "thin" if m < low else "" for m in mass]


def caption(label: int, style: str, rng: np.random.Generator) -> str:
    """A random caption for a digit, e.g. "a handwritten seven", "the digit 7", "number seven, bold"."""
    text = TEMPLATES[rng.integers(len(TEMPLATES))].format(word=WORDS[label], n=label)
    return f"{text}, {style}" if style and rng.random() < 0.5 else text


def prompt(label: int) -> str:
    """The prompt the quality oracle and the grid use for a digit."""
    return f"a handwritten {WORDS[label]}"
