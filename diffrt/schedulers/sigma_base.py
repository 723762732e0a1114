"""What the k-diffusion family of schedulers shares: ``SigmaScheduler`` (training sigma table, schedule
construction, ``init_noise_sigma``, ``scale_model_input``, ``add_noise``), ``StandardSigmaScheduler`` (its
``set_timesteps`` with Diffusers' usual arguments) and the sigma-space update helpers.

These schedulers integrate x = x0 + sigma * eps over a descending sigma list (Karras et al. 2022): Euler and Euler
Ancestral, Heun, LMS, KDPM2 and KDPM2 Ancestral, DPM++ SDE, EDM Euler build on the class; ``euler_update`` is the
Euler step they share and ``ancestral_step`` the noise split of the ancestral samplers.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import InputError, invalid
from .base import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SchedulerBase,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    check_sigma_flags,
    freeze,
    sigma_schedule,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
    torch_linspace_f32,
)

SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


class SigmaScheduler(SchedulerBase):
    """Base of the schedulers that integrate x = x0 + sigma * eps over a descending sigma list.

    Config keys a subclass lacks (``use_karras_sigmas``, ``interpolation_type``, ``final_sigmas_type``, ...)
    read as their Diffusers defaults, so one schedule construction (``_set_sigma_schedule``) serves Euler, Euler
    Ancestral, Heun, LMS and KDPM2. The public ``set_timesteps`` is the subclasses': their positional arguments
    differ as in Diffusers (KDPM2 and DPM++ SDE take ``num_train_timesteps`` third, EDM Euler ``sigmas``)."""

    sigmas: np.ndarray

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
    def _set_sigma_schedule(self, num_inference_steps: Any, timesteps: Any, sigmas: Any) -> None:
        """Build the schedule from a step count, custom timesteps or custom sigmas (n steps -> n + 1 sigmas, the
        last the final sigma)."""
        steps, timesteps, sigmas = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                       self.config.num_train_timesteps)
        if timesteps is not None:
            self._check_custom_timesteps_allowed(timesteps)
        if sigmas is not None:
            full = sigmas.astype(np.float32)
            times = sigma_to_t(full[:-1], self.log_sigmas)
        else:
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
    def init_noise_sigma(self) -> float | np.float32:
        """Standard deviation of the initial noise: sigma_max, or sqrt(sigma_max^2 + 1) for ``leading`` spacing
        (whose first timestep is below the last training step). float32 here; EDM Euler's is a float."""
        max_sigma = np.float32(self.sigmas.max())
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return np.sqrt(max_sigma * max_sigma + np.float32(1))

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1) so the model sees unit-variance input (the EDM c_in)."""
        sigma = self.sigmas[self._current_step_index(timestep)]
        self.is_scale_input_called = True
        return sample / np.sqrt(sigma * sigma + np.float32(1))

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """x0 + sigma(t) * noise (`add_sigma_noise`)."""
        return add_sigma_noise(self, original_samples, noise, timesteps)

    def _begin_sigma_step(self, model_output: np.ndarray, timestep: Any,
                          sample: np.ndarray) -> tuple[np.ndarray, int]:
        """Checks shared by the sigma-space steps; returns the sample as float32 (Diffusers upcasts too) and the
        step index."""
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            # sigma-space timesteps are floats; an int is almost always an ``enumerate`` index by mistake
            raise InputError(
                f"`timestep` must be one of `scheduler.timesteps` (floats), not an integer index; got {timestep!r}"
            )
        step_index = self._start_step(model_output, timestep)
        return sample.astype(np.float32, copy=False), step_index


class StandardSigmaScheduler(SigmaScheduler):
    """A ``SigmaScheduler`` with Diffusers' usual ``set_timesteps(num_inference_steps, device, timesteps, sigmas)``
    (Euler, Euler Ancestral, Heun, LMS)."""

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Build the schedule from a step count, custom timesteps or custom sigmas (n steps -> n + 1 sigmas, the
        last the final sigma). ``device`` is accepted for API compatibility and ignored (NumPy lives on the CPU)."""
        self._set_sigma_schedule(num_inference_steps, timesteps, sigmas)


def euler_update(sample: np.ndarray, x0: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """x + (x - x0) / sigma * (sigma_next - sigma): one Euler step of dx/dsigma = (x - x0) / sigma, in the
    operation order Diffusers uses (so float32 rounding matches), with one temporary."""
    out = np.subtract(sample, x0)
    out /= sigma
    out *= sigma_next - sigma
    out += sample
    return out


def ancestral_step(sigma_from: Any, sigma_to: Any, eta: float = 1.0) -> tuple[Any, Any]:
    """(sigma_down, sigma_up) of an ancestral step from ``sigma_from`` to ``sigma_to``: step deterministically
    down to sigma_down, then add fresh noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_to^2;
    ``eta`` scales the noise (0: a plain deterministic step). k-diffusion's ``get_ancestral_step``.

    Scalars or arrays, in their own dtype. Squares are ``x * x``, which is what torch computes for ``x ** 2``
    (NumPy's scalar ``x ** 2`` goes through ``powf`` and can land an ulp away). sigma_up is capped at sigma_to as in
    k-diffusion: for sigma_to below about 2**-12 sigma_from, float32 rounding can put it an ulp above, which would
    make sigma_down the square root of a negative number (NaN)."""
    if not eta:
        return sigma_to, np.zeros_like(sigma_to)[()]  # [()]: a NumPy scalar for scalar input, as sigma_to
    from_sq, to_sq = sigma_from * sigma_from, sigma_to * sigma_to
    sigma_up = np.minimum(sigma_to, eta * np.sqrt(to_sq * (from_sq - to_sq) / from_sq))
    sigma_down = np.sqrt(to_sq - sigma_up * sigma_up)
    return sigma_down, sigma_up


class SigmaRun(Protocol):
    """What ``add_sigma_noise`` reads of a scheduler: its sigma table, where its run stands, the timestep lookup."""

    sigmas: np.ndarray
    _step_index: int | None
    _begin_index: int | None

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int: ...


def add_sigma_noise(scheduler: SigmaRun, original_samples: np.ndarray, noise: np.ndarray,
                    timesteps: Any) -> np.ndarray:
    """x0 + sigma(t) * noise, the forward process of every sigma-space scheduler. Before a run, looks up each
    timestep; after ``set_begin_index`` (img2img) or mid-run (inpainting) uses that index, as Diffusers does."""
    timesteps = np.asarray(timesteps).reshape(-1)
    if scheduler._begin_index is None:
        indices = [scheduler.index_for_timestep(t) for t in timesteps]
    elif scheduler._step_index is not None:
        indices = [scheduler._step_index] * len(timesteps)
    else:
        indices = [scheduler._begin_index] * len(timesteps)
    sigma = scheduler.sigmas.astype(original_samples.dtype)[indices]
    sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
    return original_samples + noise * sigma
