"""``AlphaScheduler``: what the integer-timestep, alpha-bar parameterised schedulers share (DDIM, DDPM, LCM, TCD,
PNDM, DDIM inversion): training tables, integer spacing, custom ``timesteps=`` / ``sigmas=``, x0 clipping /
thresholding, ``add_noise``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import invalid
from .base import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerBase,
    add_noise_alpha,
    alpha_space_x0_eps,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    dynamic_threshold,
    freeze,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)


class AlphaScheduler(SchedulerBase):
    """Base of the schedulers stepping between integer training timesteps with x_t = sqrt(a) x0 + sqrt(1-a) eps.

    Custom ``sigmas=`` (n + 1 values, the last the final sigma, as for Euler) become integer timesteps through
    the training sigma table: t = round(sigma_to_t(sigma)); the final sigma is implied by the scheduler (its
    final alpha), so it is not used."""

    final_alpha_cumprod: np.float32  # the alpha-bar after the last step; set by the schedulers that use it

    def _init_tables(self, beta_schedules: Sequence[str] = BETA_SCHEDULES) -> None:
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("prediction_type", self.config.prediction_type, PREDICTION_TYPES)
        self.betas, self.alphas, alphas_cumprod = alphas_cumprod_from_config(self.config, beta_schedules)
        self.alphas_cumprod = freeze(alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        self.timesteps = freeze(np.arange(0, self.config.num_train_timesteps)[::-1].astype(np.int64))
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self) -> np.float32:
        """Alpha-space samplers start from unit-variance noise."""
        return np.float32(1.0)

    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Identity: the model input needs no scaling in alpha space."""
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Forward process q(x_t | x_0) at integer timesteps."""
        return add_noise_alpha(self.alphas_cumprod, original_samples, noise, timesteps)

    # ---- schedule
    def _parse_schedule(self, num_inference_steps: Any, timesteps: Any,
                        sigmas: Any) -> tuple[int, np.ndarray | None]:
        """Validate ``set_timesteps`` arguments; returns (step count, int64 custom timesteps or None)."""
        cfg = self.config
        steps, custom, sigmas = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                    cfg.num_train_timesteps, max_steps=cfg.num_train_timesteps)
        if sigmas is not None:
            custom = self._timesteps_from_sigmas(sigmas)
        elif custom is not None:
            if not np.all(custom == np.round(custom)):
                raise invalid("timesteps", "integers", custom.tolist())
            custom = custom.astype(np.int64)
        return steps, custom

    def _timesteps_from_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):  # a zero-SNR table ends in sigma = inf; interpolation clips there
            log_sigmas = np.log(sigmas_from_alphas_cumprod(self.alphas_cumprod))
        timesteps = np.round(sigma_to_t(sigmas[:-1], log_sigmas)).astype(np.int64)
        if np.any(np.diff(timesteps) >= 0):
            raise invalid("sigmas", "distinct enough to map to strictly descending integer timesteps",
                          f"{sigmas.tolist()} -> timesteps {timesteps.tolist()}")
        return timesteps

    def _spaced_integer_timesteps(self, num_steps: int) -> np.ndarray:
        """Diffusers' integer spacing: linspace rounded, leading + steps_offset, trailing - 1."""
        cfg = self.config
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, num_steps, cfg.steps_offset)
        return timesteps.round().astype(np.int64)

    def _alpha_prev(self, prev_timestep: int) -> np.float32:
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def previous_timestep(self, timestep: Any) -> int:
        """The next timestep of the schedule (-1 after the last), found by position as in Diffusers' DDPM."""
        index = self.index_for_timestep(timestep)
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    # ---- x0
    def _x0_eps(self, model_output: np.ndarray, sample: np.ndarray,
                alpha_prod_t: np.float32) -> tuple[np.ndarray, np.ndarray]:
        """(x0, eps) from the model output, with x0 thresholded (Imagen) or clipped as configured."""
        x0, eps = alpha_space_x0_eps(model_output, sample, alpha_prod_t, self.config.prediction_type)
        return self._process_x0(x0), eps

    def _process_x0(self, x0: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.thresholding:
            return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if cfg.clip_sample:
            return np.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
        return x0
