"""What a pipeline needs from a scheduler: the Diffusers scheduler API on NumPy arrays (../shared/design.md).

Every class of `diffrt.schedulers` satisfies it, statically too; a user's own scheduler with these members can drive
a pipeline (`pipe.scheduler = MyScheduler(...)`). `runtime_checkable` so a pipeline can refuse anything else clearly.
The signatures are what the pipelines call: the classes take more (`device`, `mu`, a scheduler's own keywords).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Scheduler(Protocol):
    """One run's scheduler state; `clone()` gives a fresh one (each pipeline call works on its own clone)."""

    @property
    def config(self) -> Any:
        """The scheduler's configuration: a mapping that also reads as attributes (`config.num_train_timesteps`),
        like Diffusers' FrozenDict."""

    @property
    def timesteps(self) -> np.ndarray: ...

    @property
    def init_noise_sigma(self) -> float | np.floating[Any]:
        """A float, or a NumPy float32 where the schedule's own sigma sets it (sigma-space schedulers)."""

    @property
    def order(self) -> int: ...

    def set_timesteps(self, num_inference_steps: int | None = None, *, timesteps: Sequence[float] | None = None,
                      sigmas: Sequence[float] | None = None) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray: ...

    def step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, *args: Any, **kwargs: Any) -> Any: ...

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray: ...

    def set_begin_index(self, begin_index: int = 0) -> None: ...

    def clone(self) -> Scheduler: ...
