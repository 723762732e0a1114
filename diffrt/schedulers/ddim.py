"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eqs. 12 and 16) as Diffusers' ``DDIMScheduler``,
on ``alpha_base.AlphaScheduler``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import invalid
from .alpha_base import AlphaScheduler
from .base import KARRAS_COMPATIBLES, SchedulerOutput, draw_noise, freeze, register_config


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
        i = self._start_step(model_output, timestep)
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
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
