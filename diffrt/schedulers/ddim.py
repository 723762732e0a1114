"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eqs. 12 and 16) as Diffusers' ``DDIMScheduler``.

``AlphaScheduler`` holds what the integer-timestep, alpha-bar parameterised schedulers share (DDIM, DDPM, LCM):
training tables, integer spacing, custom ``timesteps=`` / ``sigmas=``, x0 clipping / thresholding, ``add_noise``.
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
    SchedulerOutput,
    add_noise_alpha,
    alpha_space_x0_eps,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    draw_noise,
    dynamic_threshold,
    freeze,
    register_config,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from .euler import KARRAS_COMPATIBLES


class AlphaScheduler(SchedulerBase):
    """Base of the schedulers stepping between integer training timesteps with x_t = sqrt(a) x0 + sqrt(1-a) eps.

    Custom ``sigmas=`` (n + 1 values, the last the final sigma, as for Euler) become integer timesteps through
    the training sigma table: t = round(sigma_to_t(sigma)); the final sigma is implied by the scheduler (its
    final alpha), so it is not used."""

    timesteps: np.ndarray

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
    def _parse_schedule(self, num_inference_steps: Any, timesteps: Any, sigmas: Any) -> tuple[int | None, Any]:
        """Validate ``set_timesteps`` arguments; returns (step count or None, int64 custom timesteps or None)."""
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
    def _x0_eps(self, model_output: np.ndarray, sample: np.ndarray, alpha_prod_t: np.float32) -> tuple:
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


class DDIMScheduler(AlphaScheduler):
    """Deterministic (eta = 0) or stochastic (eta > 0) DDIM. Beyond Diffusers: custom ``timesteps=`` and
    ``sigmas=``; with those the previous timestep is the next one in the list (Diffusers' step-count schedules
    keep their t - T // n rule, which differs for ``linspace``)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._init_tables()
        # the step to x0 has no "previous" alpha-bar: 1 (clean) or, as in some checkpoints, alpha-bar at t = 0
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Integer timesteps from a step count (``timestep_spacing``), or custom timesteps / sigmas.
        ``device`` is accepted for API compatibility and ignored."""
        steps, custom = self._parse_schedule(num_inference_steps, timesteps, sigmas)
        self.custom_timesteps = custom is not None
        self.timesteps = freeze(custom if custom is not None else self._spaced_integer_timesteps(steps))
        self.num_inference_steps = len(self.timesteps) if custom is not None else steps
        self._reset_run_state()

    def _prev_timestep(self, timestep: int) -> int:
        if self.custom_timesteps:
            return self.previous_timestep(timestep)
        return timestep - self.config.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Any = None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z, s = eta * sigma_t(eta = 1) (eq. 12, 16)."""
        self._start_step(model_output, timestep)
        t = int(np.asarray(timestep).item())
        prev_t = self._prev_timestep(t)
        alpha_prod_t, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        x0, eps = self._x0_eps(model_output, sample, alpha_prod_t)
        beta_prod_t = np.float32(1) - alpha_prod_t
        variance = (np.float32(1) - alpha_prev) / beta_prod_t * (np.float32(1) - alpha_prod_t / alpha_prev)
        std_dev_t = np.float32(eta) * np.sqrt(variance)
        if use_clipped_model_output:  # re-derive eps from the clipped x0, as GLIDE does
            eps = (sample - np.sqrt(alpha_prod_t) * x0) / np.sqrt(beta_prod_t)
        direction = np.sqrt(np.float32(1) - alpha_prev - std_dev_t * std_dev_t) * eps
        prev_sample = np.sqrt(alpha_prev) * x0
        prev_sample += direction
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise invalid("variance_noise", "None when `generator` is given", "an array")
            if variance_noise is None:
                variance_noise = draw_noise(model_output.shape, generator, model_output.dtype)
            prev_sample += std_dev_t * variance_noise
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
