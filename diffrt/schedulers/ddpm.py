"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eqs. 6-7) as Diffusers'
``DDPMScheduler``: the posterior mean from x0, plus noise of the configured variance on every step but t = 0."""
from __future__ import annotations

from typing import Any

import numpy as np

from .alpha_base import AlphaScheduler
from .base import (
    BETA_SCHEDULES,
    KARRAS_COMPATIBLES,
    SchedulerOutput,
    alpha_space_x0,
    check_choice,
    draw_noise,
    freeze,
    register_config,
)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
DDPM_BETA_SCHEDULES = (*BETA_SCHEDULES, "laplace", "sigmoid")


class DDPMScheduler(AlphaScheduler):
    """Stochastic DDPM sampler. Beyond Diffusers: custom ``sigmas=``, and ``fixed_large_log`` treated as the
    log-variance it is (Diffusers takes the square root of log(beta), which is NaN)."""

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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._init_tables(DDPM_BETA_SCHEDULES)
        self.variance_type = variance_type

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
        self.num_inference_steps = len(self.timesteps)
        self._reset_run_state()

    def _noise_std(self, t: int, prev_t: int, predicted_variance: Any) -> np.ndarray | np.float32:
        """Standard deviation of the noise added at step t -> prev_t, per ``variance_type``."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1)
        current_beta_t = np.float32(1) - alpha_prod_t / alpha_prev
        # posterior variance beta~_t (eq. 7), clamped because several types take its log
        variance = (np.float32(1) - alpha_prev) / (np.float32(1) - alpha_prod_t) * current_beta_t
        variance = np.maximum(variance, np.float32(1e-20))
        kind = self.variance_type
        if kind == "fixed_small":
            return np.sqrt(variance)
        if kind == "fixed_small_log":
            return np.exp(np.float32(0.5) * np.log(variance))
        if kind == "fixed_large":
            return np.sqrt(current_beta_t)
        if kind == "fixed_large_log":
            return np.exp(np.float32(0.5) * np.log(current_beta_t))
        if kind == "learned":
            return np.sqrt(predicted_variance)
        frac = (predicted_variance + np.float32(1)) / np.float32(2)  # learned_range (Nichol & Dhariwal 2021)
        log_variance = frac * np.log(current_beta_t) + (np.float32(1) - frac) * np.log(variance)
        return np.exp(np.float32(0.5) * log_variance)

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Posterior mean mu~(x_t, x0) (eq. 7) plus std * z for t > 0. With ``learned`` / ``learned_range``
        variance the model output carries twice the sample's channels: prediction, then variance."""
        i = self._start_step(model_output, timestep)
        t = int(np.asarray(timestep).item())
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = np.split(model_output, 2, axis=1)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1)
        beta_prod_t, beta_prev = np.float32(1) - alpha_prod_t, np.float32(1) - alpha_prev
        current_alpha_t = alpha_prod_t / alpha_prev
        current_beta_t = np.float32(1) - current_alpha_t
        x0 = self._process_x0(alpha_space_x0(model_output, sample, alpha_prod_t, self.config.prediction_type))
        x0_coeff = np.sqrt(alpha_prev) * current_beta_t / beta_prod_t
        sample_coeff = np.sqrt(current_alpha_t) * beta_prev / beta_prod_t
        prev_sample = x0_coeff * x0
        prev_sample += sample_coeff * sample
        if t > 0:
            noise = draw_noise(model_output.shape, generator, model_output.dtype)
            noise *= self._noise_std(t, prev_t, predicted_variance)
            prev_sample += noise
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
