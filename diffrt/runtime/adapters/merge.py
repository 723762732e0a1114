"""A weight with low-rank updates merged in: `base + sum(weight_i * scale_i * up_i @ down_i)`, in the layout and
dtype of the initializer that holds it.

Written for speed on a CPU, where a LoRA switch on an SD 1.5 UNet merges about a gigabyte of weights
(docs/benchmarks.md): the adapters' factors are stacked so that all of them make one float32 GEMM (BLAS, every
core); a MatMul weight stored transposed is produced transposed by the GEMM itself (`down.T @ up.T`, no copy); and
the base is added in place into the GEMM's output, so each merged weight costs one new array and no temporaries.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from diffrt.errors import InputError
from diffrt.package.weights import LAYOUT_TRANSPOSED
from diffrt.runtime.adapters.lora_file import LoraUpdate


def stacked_factors(terms: Sequence[tuple[LoraUpdate, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(up [out, R], down [R, in * kh * kw]) with each update's weight * scale folded into its `up` columns, so that
    `up @ down` is the sum of the updates (R = the sum of their ranks)."""
    ups = [update.up.reshape(update.up.shape[0], -1) * np.float32(weight * update.scale) for update, weight in terms]
    downs = [update.down.reshape(update.rank, -1) for update, _ in terms]
    if len(terms) == 1:
        return ups[0], downs[0].astype(np.float32, copy=False)
    return np.concatenate(ups, axis=1), np.concatenate(downs, axis=0).astype(np.float32, copy=False)


def merged_weight(base: np.ndarray, layout: str, terms: Sequence[tuple[LoraUpdate, float]],
                  what: str) -> np.ndarray:
    """`base` (an initializer as exported, `layout` "direct" or "transposed") plus the updates `terms`
    ([(update, adapter weight)]); a new array of `base`'s shape and dtype. InputError naming `what` when the
    updates' size is not the weight's (a LoRA made for another model)."""
    up, down = stacked_factors(terms)
    if up.shape[0] * down.shape[1] != base.size:
        raise InputError(f"LoRA update of {what} has {up.shape[0] * down.shape[1]} values; the package's weight has "
                         f"{base.size} (a LoRA for another model?)")
    # The initializer of a transposed (MatMul) weight is (up @ down).T = down.T @ up.T: BLAS reads the transposed
    # views directly and writes the result in the initializer's own order.
    merged = np.matmul(down.T, up.T) if layout == LAYOUT_TRANSPOSED else np.matmul(up, down)
    merged = merged.reshape(base.shape)
    np.add(merged, base, out=merged)
    return merged if base.dtype == np.float32 else merged.astype(base.dtype)
