"""Euler and Euler-Ancestral samplers in sigma space (Karras et al. 2022, Algorithm 2; k-diffusion's
``sample_euler`` / ``sample_euler_ancestral``), with Diffusers' ``EulerDiscreteScheduler`` /
``EulerAncestralDiscreteScheduler`` API and config. What they share with the rest of the k-diffusion family lives in
``sigma_base``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import (
    KARRAS_COMPATIBLES,
    SchedulerOutput,
    check_choice,
    draw_noise,
    register_config,
    sigma_space_x0,
)
from .sigma_base import StandardSigmaScheduler, ancestral_step, euler_update


class EulerDiscreteScheduler(StandardSigmaScheduler):
    """Euler method on the probability-flow ODE in sigma (Karras et al. 2022, Algorithm 2 with optional churn)."""

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
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self._init_tables()
        self._init_training_schedule()

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One Euler step from sigma_i to sigma_{i+1}; with ``s_churn`` > 0, first raise the noise level to
        sigma_hat = sigma (1 + gamma) with fresh noise (Karras et al. 2022, Algorithm 2, lines 5-7)."""
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        sigma = self.sigmas[i]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:
            eps = draw_noise(model_output.shape, generator, model_output.dtype) * np.float32(s_noise)
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)
        # epsilon is scaled by the churned level; v-prediction's c_skip / c_out use the scheduled sigma
        sigma_x0 = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        pred_original_sample = sigma_space_x0(model_output, sample, sigma_x0, self.config.prediction_type)
        prev_sample = euler_update(sample, pred_original_sample, sigma_hat, self.sigmas[i + 1])
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class EulerAncestralDiscreteScheduler(StandardSigmaScheduler):
    """Euler-Ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up, so the marginal
    matches sigma_next (k-diffusion ``get_ancestral_step`` with eta = 1). Beyond Diffusers: custom
    ``timesteps=`` / ``sigmas=`` and ``prediction_type="sample"``."""

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
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._init_tables()
        self._init_training_schedule()

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Ancestral step sigma_i -> sigma_down (Euler), + sigma_up * noise. Noise is drawn on every step,
        the last included, so a seeded generator advances exactly as in Diffusers."""
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        sigma = self.sigmas[i]
        sigma_to = self.sigmas[i + 1]
        pred_original_sample = sigma_space_x0(model_output, sample, sigma, self.config.prediction_type)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_to)
        prev_sample = euler_update(sample, pred_original_sample, sigma, sigma_down)
        noise = draw_noise(model_output.shape, generator, model_output.dtype)
        noise *= sigma_up
        prev_sample += noise
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
