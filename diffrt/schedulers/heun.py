"""Heun's second-order method in sigma space (Karras et al. 2022, Algorithm 1), as Diffusers'
``HeunDiscreteScheduler``: every interior sigma appears twice, the model is called once per entry, and the
scheduler alternates an Euler predictor with a trapezoidal corrector. Beyond Diffusers: custom ``sigmas=``."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .base import BETA_SCHEDULES, KARRAS_COMPATIBLES, SchedulerOutput, freeze, register_config, sigma_space_x0
from .sigma_base import StandardSigmaScheduler

HEUN_BETA_SCHEDULES = (*BETA_SCHEDULES, "exp")


class HeunDiscreteScheduler(StandardSigmaScheduler):
    """Second-order sampler: two model evaluations per sigma interval (``order = 2``); the final interval
    to sigma = 0 is a plain Euler step, as in Karras et al. (a second evaluation at sigma = 0 is undefined)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._init_tables(beta_schedules=HEUN_BETA_SCHEDULES)
        self.set_timesteps(num_train_timesteps)  # Diffusers starts from the full training schedule

    def _install_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Repeat each interior sigma (and each timestep after the first): predictor and corrector share it."""
        self.sigmas = freeze(np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]))
        self.timesteps = freeze(np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]))

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.prev_derivative: np.ndarray | None = None
        self.dt: np.float32 | None = None
        self.sample: np.ndarray | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (Euler) step."""
        return self.dt is None

    def _predictor_state(self) -> tuple[np.ndarray, np.float32, np.ndarray]:
        """(slope, step, start sample) the predictor kept for the corrector."""
        if self.prev_derivative is None or self.dt is None or self.sample is None:
            raise InputError("a Heun corrector step needs the predictor's state (prev_derivative, dt, sample); "
                             "call `set_timesteps` to start a new run")
        return self.prev_derivative, self.dt, self.sample

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Predictor: Euler from sigma to sigma_next, remembering the slope. Corrector: average that slope with
        the one at sigma_next and redo the step from the remembered sample."""
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = sigma_space_x0(model_output, sample, sigma if first else sigma_next, self.config.prediction_type)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = np.clip(x0, -limit, limit)
        derivative = np.subtract(sample, x0)
        if first:
            derivative /= sigma
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            dt, base = self.dt, sample
        else:
            prev_derivative, dt, base = self._predictor_state()
            derivative /= sigma_next
            derivative += prev_derivative
            derivative /= np.float32(2)
            self.prev_derivative = self.dt = self.sample = None
        derivative = derivative * dt  # not in place: a predictor's slope is kept for the corrector
        prev_sample = np.add(base, derivative, out=derivative).astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
