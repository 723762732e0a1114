"""The ControlNet residual inputs of a UNet (docs/package-format.md): which inputs they are, and their shapes.

A package with ControlNets has one UNet that takes the residuals as inputs; a call that runs no ControlNet (a
plain text-to-image call on such a package, or a step outside `control_guidance_start..end`) feeds zeros, which
the UNet adds to nothing.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from diffrt.package.names import UNET_DOWN_RESIDUAL, UNET_MID_RESIDUAL
from diffrt.package.specs import TensorSpec

_LEVEL = re.compile(r"^(height|width)_(\d+)$")


def residual_specs(inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The residual inputs among a UNet engine's inputs, in order (skips, then mid); empty for a plain UNet."""
    down = UNET_DOWN_RESIDUAL.split("{")[0]
    return [spec for spec in inputs if spec.name.startswith(down) or spec.name == UNET_MID_RESIDUAL]


def residual_shape(spec: TensorSpec, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The concrete shape of residual input `spec` for latents of `batch` x `height` x `width`: a side named
    `height_k` is ceil(height / 2**k), the size of the UNet's level-k feature maps."""
    shape = []
    for dim in spec.shape:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim == "batch":
            shape.append(batch)
        elif dim in ("height", "width"):
            shape.append(height if dim == "height" else width)
        else:
            match = _LEVEL.match(str(dim))
            if match is None:
                raise ValueError(f"UNet input {spec.name}: unknown dimension {dim!r}")
            side = height if match.group(1) == "height" else width
            shape.append(math.ceil(side / 2 ** int(match.group(2))))
    return tuple(shape)


def zero_residuals(specs: Sequence[TensorSpec], sample_shape: Sequence[int]) -> dict[str, np.ndarray]:
    """Zero residuals for a UNet `sample` of `sample_shape` (NCHW)."""
    batch, _, height, width = sample_shape
    return {spec.name: np.zeros(residual_shape(spec, batch, height, width), np.float32) for spec in specs}
