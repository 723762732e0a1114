"""Euler and Euler-Ancestral samplers in sigma space (Karras et al. 2022, Algorithm 2; k-diffusion's
``sample_euler`` / ``sample_euler_ancestral``), with Diffusers' ``EulerDiscreteScheduler`` /
``EulerAncestralDiscreteScheduler`` API and config.

``SigmaScheduler`` holds what the k-diffusion family shares (training sigma table, schedule construction,
``init_noise_sigma``, ``scale_model_input``, ``add_noise``); Heun builds on it too.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError, invalid
from .base import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerBase,
    SchedulerOutput,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    check_sigma_flags,
    draw_noise,
    freeze,
    register_config,
    sigma_schedule,
    sigma_space_x0,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    torch_linspace_f32,
)

KARRAS_COMPATIBLES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)  # Diffusers' KarrasDiffusionSchedulers: the schedulers that accept each other's configs
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


class SigmaScheduler(SchedulerBase):
    """Base of the schedulers that integrate x = x0 + sigma * eps over a descending sigma list.

    Config keys a subclass lacks (``use_karras_sigmas``, ``interpolation_type``, ``final_sigmas_type``, ...)
    read as their Diffusers defaults, so one ``set_timesteps`` serves Euler, Euler Ancestral and Heun."""

    sigmas: np.ndarray
    timesteps: np.ndarray

    def _init_tables(self, beta_schedules: Sequence[str] = BETA_SCHEDULES,
                     prediction_types: Sequence[str] = PREDICTION_TYPES) -> None:
        """Training tables from the config. With zero-terminal-SNR betas the last alpha-bar is 0 and sigma would
        be infinite, so (like Diffusers) it becomes 2**-24, the smallest positive fp16 subnormal."""
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("prediction_type", self.config.prediction_type, prediction_types)
        check_sigma_flags(self.config)
        self.betas, self.alphas, alphas_cumprod = alphas_cumprod_from_config(self.config, beta_schedules)
        if self.config.get("rescale_betas_zero_snr", False):
            alphas_cumprod[-1] = 2.0**-24
        self.alphas_cumprod = freeze(alphas_cumprod)
        self.train_sigmas = freeze(sigmas_from_alphas_cumprod(alphas_cumprod))  # ascending in t
        self.log_sigmas = freeze(np.log(self.train_sigmas))
        self.num_inference_steps: int | None = None
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def _init_training_schedule(self) -> None:
        """Before ``set_timesteps``: every training sigma, descending, then 0 (Diffusers' initial state)."""
        sigmas = self.train_sigmas[::-1]
        steps = self.config.num_train_timesteps
        self.sigmas = freeze(np.concatenate([sigmas, np.zeros(1, np.float32)]))
        self.timesteps = freeze(self._model_timesteps(sigmas, np.linspace(0, steps - 1, steps)[::-1]))

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Build the schedule from a step count, custom timesteps or custom sigmas (n steps -> n + 1 sigmas, the
        last the final sigma). ``device`` is accepted for API compatibility and ignored (NumPy lives on the CPU)."""
        steps, timesteps, sigmas = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                       self.config.num_train_timesteps)
        if timesteps is not None:
            self._check_custom_timesteps_allowed(timesteps)
        if sigmas is not None:
            full = sigmas.astype(np.float32)
            times = sigma_to_t(full[:-1], self.log_sigmas)
            steps = len(full) - 1
        else:
            steps = steps if steps is not None else len(timesteps)
            times, full = self._sigma_schedule(steps, timesteps)
        self.num_inference_steps = steps
        self._install_schedule(self._model_timesteps(full[:-1], times), full)
        self._reset_run_state()

    def _check_custom_timesteps_allowed(self, timesteps: np.ndarray) -> None:
        flag = next((k for k in SIGMA_FLAGS if self.config.get(k)), None)
        if flag or self._continuous_v():
            why = f"`{flag}` = True" if flag else "continuous v-prediction timesteps"
            raise invalid("timesteps", f"None with {why} (pass `sigmas` instead)", timesteps.tolist())

    def _sigma_schedule(self, num_steps: int, custom: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, float32 sigmas with the final one) for a step count or custom timesteps, following
        Diffusers' order: spacing -> interpolated sigmas -> optional karras / exponential / beta -> final sigma."""
        cfg = self.config
        if custom is not None:
            timesteps = custom.astype(np.float32)
        else:
            timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, num_steps,
                                         cfg.steps_offset).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
        if cfg.get("interpolation_type", "linear") == "log_linear":  # n + 1 sigmas: Diffusers' quirk, kept
            log_range = torch_linspace_f32(self.log_sigmas[-1], self.log_sigmas[0], num_steps + 1)
            sigmas = np.exp(log_range)
        scheduled = sigma_schedule(cfg, sigmas, num_steps)
        if scheduled is not sigmas:
            sigmas = scheduled
            timesteps = sigma_to_t(sigmas, self.log_sigmas)
        final = float(self.train_sigmas[0]) if cfg.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
        return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)

    def _continuous_v(self) -> bool:
        return self.config.get("timestep_type") == "continuous" and self.config.prediction_type == "v_prediction"

    def _model_timesteps(self, sigmas: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """Model timesteps: the discrete ones, or EDM's c_noise = log(sigma) / 4 for continuous v-prediction."""
        if self._continuous_v():
            return np.float32(0.25) * np.log(sigmas.astype(np.float32))
        return np.asarray(timesteps).astype(np.float32)

    def _install_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self.timesteps = freeze(timesteps)
        self.sigmas = freeze(sigmas)

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.is_scale_input_called = False

    # ---- per-step helpers
    @property
    def init_noise_sigma(self) -> np.float32:
        """Standard deviation of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for ``leading`` spacing
        (whose first timestep is below the last training step)."""
        max_sigma = np.float32(self.sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return np.sqrt(max_sigma * max_sigma + np.float32(1))

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1) so the model sees unit-variance input (the EDM c_in)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / np.sqrt(sigma * sigma + np.float32(1))

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """x0 + sigma(t) * noise. Before a run, looks up each timestep; after ``set_begin_index`` (img2img) or
        mid-run (inpainting) uses that index, as Diffusers does."""
        timesteps = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timesteps]
        elif self._step_index is not None:
            indices = [self._step_index] * len(timesteps)
        else:
            indices = [self._begin_index] * len(timesteps)
        sigma = self.sigmas.astype(original_samples.dtype)[indices]
        sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        return original_samples + noise * sigma

    def _begin_sigma_step(self, model_output: np.ndarray, timestep: Any, sample: np.ndarray) -> np.ndarray:
        """Checks shared by the sigma-space steps; returns the sample as float32 (Diffusers upcasts too)."""
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            # sigma-space timesteps are floats; an int is almost always an ``enumerate`` index by mistake
            raise InputError(
                f"`timestep` must be one of `scheduler.timesteps` (floats), not an integer index; got {timestep!r}"
            )
        self._start_step(model_output, timestep)
        return sample.astype(np.float32, copy=False)


def _euler_update(sample: np.ndarray, x0: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """x + (x - x0) / sigma * (sigma_next - sigma): one Euler step of dx/dsigma = (x - x0) / sigma, in the
    operation order Diffusers uses (so float32 rounding matches), with one temporary."""
    out = np.subtract(sample, x0)
    out /= sigma
    out *= sigma_next - sigma
    out += sample
    return out


class EulerDiscreteScheduler(SigmaScheduler):
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
        sample = self._begin_sigma_step(model_output, timestep, sample)
        sigma = self.sigmas[self._step_index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:
            eps = draw_noise(model_output.shape, generator, model_output.dtype) * np.float32(s_noise)
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)
        # epsilon is scaled by the churned level; v-prediction's c_skip / c_out use the scheduled sigma
        sigma_x0 = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        pred_original_sample = sigma_space_x0(model_output, sample, sigma_x0, self.config.prediction_type)
        prev_sample = _euler_update(sample, pred_original_sample, sigma_hat, self.sigmas[self._step_index + 1])
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
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
        sample = self._begin_sigma_step(model_output, timestep, sample)
        sigma = self.sigmas[self._step_index]
        sigma_to = self.sigmas[self._step_index + 1]
        pred_original_sample = sigma_space_x0(model_output, sample, sigma, self.config.prediction_type)
        sigma_up = np.sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma))
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)
        prev_sample = _euler_update(sample, pred_original_sample, sigma, sigma_down)
        noise = draw_noise(model_output.shape, generator, model_output.dtype)
        noise *= sigma_up
        prev_sample += noise
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
