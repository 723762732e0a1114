"""The UNet's `timestep` feed in the form each exporter's graph takes it."""
from __future__ import annotations

import numpy as np

from diffrt.errors import InputError
from diffrt.runtime.engines.base import Engine


def scalar_timestep(engine: Engine, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """UNets exported by Optimum take `timestep` as a scalar (rank 0), one value for the whole batch; ours take one
    per batch row. Every row of a denoising step has the same timestep, so the scalar is that value."""
    spec = next((spec for spec in engine.inputs if spec.name == "timestep"), None)
    timestep = feeds.get("timestep")
    if spec is None or len(spec.shape) != 0 or timestep is None or timestep.ndim == 0:
        return feeds
    if timestep.size == 0 or not np.all(timestep == timestep.flat[0]):
        raise InputError(f"`timestep` must be one value for the whole batch (this UNet takes a scalar); got "
                         f"{timestep.tolist()}")
    return {**feeds, "timestep": np.asarray(timestep.flat[0], dtype=timestep.dtype)}
