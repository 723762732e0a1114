"""FLUX.1's rotary position embedding: (cos, sin) tables from the position ids, in float32 as exact as diffusers'
float64 ones.

Diffusers builds the rotary embedding with complex numbers or float64 (`FluxPosEmbed`, `get_1d_rotary_pos_embed`,
`apply_rotary_emb`); ONNX has no complex type and TensorRT no float64, so here the angles are real float32 arithmetic
in the graph, computed from the ids the caller passes (any image size, any id layout such as Kontext's). The
frequencies are computed in float64 in Python, as Diffusers does, and enter the graph as float32 constants split so
the float32 angles stay as exact as Diffusers' float64 ones (`FluxPosEmbed`). The rotation itself, and the
timestep / guidance / pooled-text embedding, are shared with SD3: `dit.apply_rotary_emb`,
`dit.CombinedTimestepTextProjEmbeddings`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def rotary_frequencies(axes_dim: Sequence[int], theta: float) -> tuple[list[float], list[int]]:
    """Per output channel: its angular frequency and the id column (axis) it rotates by.

    Channel pairs (2j, 2j+1) of axis i share frequency theta**(-2j/dim_i), computed in float64 as Diffusers does
    (`repeat_interleave_real=True`), so cos/sin come out already interleaved.
    """
    freqs: list[float] = []
    axes: list[int] = []
    for axis, dim in enumerate(axes_dim):
        for j in range(0, dim, 2):
            value = 1.0 / theta ** (j / dim)  # Python floats are float64; no tensor, so safe on the meta device
            freqs += [value, value]
            axes += [axis, axis]
    return freqs, axes


def split_frequency(freq: float, bits: int = 12) -> tuple[float, float]:
    """freq = hi + lo with hi rounded to `bits` significant bits: position * hi is then exact in float32 for integer
    positions below 2**(24 - bits), and lo is small enough that its product's rounding does not matter."""
    mantissa, exponent = math.frexp(freq)
    high = math.ldexp(round(mantissa * 2**bits), exponent - bits)
    return high, freq - high


class FluxPosEmbed(nn.Module):
    """Position ids [S, n_axes] -> (cos, sin), each [S, sum(axes_dim)] float32, as diffusers' `FluxPosEmbed`.

    Diffusers forms the angle position * frequency in float64. A float32 product is off by up to ~1e-5 rad at
    positions of a few hundred (4096 px), so the frequency is split in two (`split_frequency`): the angle is
    hi + lo with the hi product exact, and cos/sin(hi + lo) come from the angle-sum identities. That matches
    diffusers within one float32 ulp for integer ids below 4096, at the cost of four trig ops on [S, D] instead of
    two. No parameters or buffers: the frequencies are Python constants, so the module also works when the model
    is built on the meta device and its weights are assigned afterwards.
    """

    def __init__(self, theta: float, axes_dim: Sequence[int]):
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)
        freqs, self._axes = rotary_frequencies(self.axes_dim, theta)
        self._high, self._low = (list(part) for part in zip(*(split_frequency(f) for f in freqs)))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axes = torch.tensor(self._axes, dtype=torch.int64, device=ids.device)
        positions = ids.float().index_select(1, axes)  # [S, D]: each channel's id column
        high = positions * torch.tensor(self._high, dtype=torch.float32, device=ids.device)
        low = positions * torch.tensor(self._low, dtype=torch.float32, device=ids.device)
        cos_high, sin_high, cos_low, sin_low = high.cos(), high.sin(), low.cos(), low.sin()
        return cos_high * cos_low - sin_high * sin_low, sin_high * cos_low + cos_high * sin_low
