"""Euler sampler for rectified-flow models (SD3, Flux, ...), with Diffusers' ``FlowMatchEulerDiscreteScheduler``
API and config.

The path is x_sigma = (1 - sigma) x0 + sigma eps with sigma from 1 (noise) to 0 (data); the model predicts the
velocity v = eps - x0, so an Euler step is x + (sigma_next - sigma) v (Esser et al. 2024, "Scaling Rectified Flow
Transformers", sec. 2). Resolution-dependent shifting moves the sigmas towards the noise end: a fixed
sigma' = s sigma / (1 + (s - 1) sigma), or per call with ``mu`` (Flux's ``use_dynamic_shifting``).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, invalid
from .base import (
    SchedulerBase,
    SchedulerOutput,
    check_choice,
    check_sigma_flags,
    draw_noise,
    freeze,
    register_config,
    sigma_schedule,
)

logger = logging.getLogger(__name__)

TIME_SHIFT_TYPES = ("exponential", "linear")


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's fixed shift s sigma / (1 + (s - 1) sigma), in the dtype of ``sigmas``."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: np.ndarray, mu: float, shift_type: str = "exponential", power: float = 1.0) -> np.ndarray:
    """Flux's resolution shift of sigma t: e^mu / (e^mu + (1/t - 1)^power), or with ``linear``
    mu / (mu + (1/t - 1)^power)."""
    scale = math.exp(mu) if shift_type == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1) ** power)


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Rescale 1 - sigma so that the last sigma becomes ``shift_terminal`` (LTX-Video's schedule)."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - (one_minus / scale)


class FlowMatchEulerDiscreteScheduler(SchedulerBase):
    """Euler on the rectified-flow ODE, or with ``stochastic_sampling`` a re-noising step to sigma_next.

    Besides Diffusers' API: ``init_noise_sigma`` (1) and an identity ``scale_model_input``, so the shared denoising
    loop needs no special case, and ``add_noise`` as a name for ``scale_noise``."""

    _compatibles: tuple[str, ...] = ()
    order = 1
    init_noise_sigma = 1.0

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ) -> None:
        check_sigma_flags(self.config)
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        if not shift > 0:
            raise invalid("shift", "> 0", shift, ConfigError)
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise invalid("shift_terminal", "None or in [0, 1)", shift_terminal, ConfigError)
        timesteps = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
        sigmas = timesteps / np.float32(num_train_timesteps)
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(sigmas, shift)
        self.timesteps = freeze(sigmas * np.float32(num_train_timesteps))
        self.sigmas = freeze(sigmas)
        # the ends of the training schedule, which every step-count schedule spans (shifted once more there,
        # as in Diffusers)
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self._shift = shift
        self.num_inference_steps: int | None = None
        self._reset_run_state()

    @property
    def shift(self) -> float:
        """The fixed shift used by ``set_timesteps``; ``set_shift`` changes it for this instance only."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        if not shift > 0:
            raise invalid("shift", "> 0", shift)
        self._shift = shift

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        return time_shift(t, mu, self.config.time_shift_type, sigma)

    def stretch_shift_to_terminal(self, t: np.ndarray) -> np.ndarray:
        return stretch_to_terminal(t, self.config.shift_terminal)

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        sigmas: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
    ) -> None:
        """Build the schedule from a step count, custom ``sigmas`` (n values in (0, 1], descending; the final 0 is
        appended here) and/or custom ``timesteps`` (n values in [0, num_train_timesteps]). ``mu`` is required with
        ``use_dynamic_shifting`` and ignored otherwise (Flux pipelines pass it for every config). ``device`` is
        ignored (NumPy)."""
        n, custom_sigmas, custom_timesteps = self._check_schedule_args(num_inference_steps, sigmas, timesteps, mu)
        cfg = self.config
        if custom_sigmas is not None:
            sigmas = custom_sigmas
        elif custom_timesteps is not None:
            logger.warning("`timesteps` without `sigmas`: the timesteps are used as given while the sigmas derived "
                           "from them are shifted, so the two may disagree; pass `sigmas` (too) to control them.")
            sigmas = custom_timesteps / cfg.num_train_timesteps
        else:
            sigmas = np.linspace(self.sigma_max * cfg.num_train_timesteps, self.sigma_min * cfg.num_train_timesteps,
                                 n) / cfg.num_train_timesteps
        with np.errstate(divide="ignore"):  # 1 / sigma at a custom sigma of 0 is the exact limit
            sigmas = self._shift_schedule(sigmas, mu)
        if cfg.shift_terminal:
            sigmas = stretch_to_terminal(sigmas, cfg.shift_terminal)
        sigmas = sigma_schedule(cfg, sigmas, n).astype(np.float32)
        timesteps = custom_timesteps if custom_timesteps is not None else sigmas * np.float32(cfg.num_train_timesteps)
        final = np.float32(0)
        if cfg.invert_sigmas:  # image -> noise direction (editing by inversion)
            sigmas = np.float32(1) - sigmas
            timesteps = sigmas * np.float32(cfg.num_train_timesteps)
            final = np.float32(1)
        self.timesteps = freeze(np.asarray(timesteps, dtype=np.float32))
        self.sigmas = freeze(np.concatenate([sigmas, [final]]).astype(np.float32))
        self.num_inference_steps = n
        self._reset_run_state()

    def _shift_schedule(self, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
        """Flux's time shift by ``mu`` with ``use_dynamic_shifting``, else SD3's fixed ``shift``."""
        if not self.config.use_dynamic_shifting:
            return shift_sigmas(sigmas, self.shift)
        if mu is None:
            raise invalid("mu", "a finite float when `use_dynamic_shifting` is True", mu)
        return time_shift(sigmas, mu, self.config.time_shift_type)

    def _check_schedule_args(self, num_inference_steps: Any, sigmas: Any, timesteps: Any,
                             mu: Any) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """Validate before any work: returns (steps, float32 sigmas or None, float32 timesteps or None)."""
        if self.config.use_dynamic_shifting and (mu is None or not np.isfinite(mu)):
            raise invalid("mu", "a finite float when `use_dynamic_shifting` is True", mu)
        if mu is not None and not self.config.use_dynamic_shifting:
            logger.debug("mu=%r ignored: use_dynamic_shifting is False", mu)
        if num_inference_steps is not None and (not isinstance(num_inference_steps, (int, np.integer))
                                                or isinstance(num_inference_steps, bool) or num_inference_steps < 1):
            raise invalid("num_inference_steps", "an int >= 1", num_inference_steps)
        if sigmas is not None:
            sigmas = _custom("sigmas", sigmas, 0.0, 1.0, include_low=False)
        if timesteps is not None:
            timesteps = _custom("timesteps", timesteps, 0.0, float(self.config.num_train_timesteps))
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise invalid("timesteps", f"as many values as `sigmas` ({len(sigmas)})", len(timesteps))
        custom = sigmas if sigmas is not None else timesteps
        if custom is None:
            if num_inference_steps is None:
                raise InputError("one of `num_inference_steps`, `sigmas`, `timesteps` must be given; got none")
            return int(num_inference_steps), None, None
        if num_inference_steps is not None and len(custom) != num_inference_steps:
            name = "sigmas" if sigmas is not None else "timesteps"
            raise invalid(name, f"`num_inference_steps` = {num_inference_steps} values when both are given",
                          len(custom))
        return len(custom), sigmas, timesteps

    # ---- per step
    def scale_model_input(self, sample: np.ndarray, timestep: Any = None) -> np.ndarray:
        """Identity: flow models take the sample as is."""
        return sample

    def scale_noise(self, sample: np.ndarray, timestep: Any, noise: np.ndarray) -> np.ndarray:
        """Forward process sigma noise + (1 - sigma) sample at each timestep (img2img's start). Before a run
        each timestep is looked up; after ``set_begin_index`` or mid-run that index is used, as in Diffusers."""
        timestep = np.asarray(timestep).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timestep]
        else:
            indices = [self._begin_index if self._step_index is None else self._step_index] * len(timestep)
        sigma = self.sigmas.astype(sample.dtype)[indices].reshape((-1,) + (1,) * (sample.ndim - 1))
        return sigma * noise + (1 - sigma) * sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """``scale_noise`` under the name the other schedulers use."""
        return self.scale_noise(original_samples, timesteps, noise)

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
        per_token_timesteps: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One Euler step x + (sigma_next - sigma) v in float32 (the result in the model output's dtype). With
        ``stochastic_sampling``: x0 = x - sigma v, re-noised to sigma_next with fresh noise. ``s_churn`` /
        ``s_tmin`` / ``s_tmax`` / ``s_noise`` are accepted for API compatibility and unused, as in Diffusers.
        ``per_token_timesteps`` (batch, tokens): each token steps from its own sigma to the next lower schedule
        sigma; the result stays float32."""
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            raise InputError("`timestep` must be one of `scheduler.timesteps` (floats), not an integer index; got "
                             f"{timestep!r}")
        i = self._start_step(model_output, timestep)
        sample = sample.astype(np.float32, copy=False)
        if per_token_timesteps is not None:
            sigma, sigma_next = self._per_token_sigmas(per_token_timesteps)
            dt = sigma - sigma_next  # Diffusers' sign for per-token stepping
        else:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            dt = sigma_next - sigma
        pred_original_sample = None
        if self.config.stochastic_sampling:
            pred_original_sample = sample - sigma * model_output
            noise = draw_noise(sample.shape, generator, sample.dtype)
            prev_sample = (1 - sigma_next) * pred_original_sample + sigma_next * noise
        else:
            prev_sample = sample + dt * model_output
        self._step_index = i + 1
        if per_token_timesteps is None:
            prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _per_token_sigmas(self, per_token_timesteps: Any) -> tuple[np.ndarray, np.ndarray]:
        """(sigma, next sigma) per token, shaped (batch, tokens, 1): the next is the largest schedule sigma
        below the token's own (by more than 1e-6, Diffusers' margin)."""
        token_sigmas = np.asarray(per_token_timesteps, dtype=np.float32) / np.float32(self.config.num_train_timesteps)
        if token_sigmas.ndim != 2:
            raise invalid("per_token_timesteps", "an array of shape (batch, tokens)", token_sigmas.shape)
        schedule = self.sigmas[:, None, None]
        lower = np.where(schedule < token_sigmas[None] - np.float32(1e-6), schedule, np.float32(0)).max(axis=0)
        return token_sigmas[..., None], lower[..., None]


def _custom(name: str, values: Any, low: float, high: float, include_low: bool = True) -> np.ndarray:
    """A custom schedule as float32: 1-D, finite, strictly descending, within [low, high] (or (low, high])."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(name, "a sequence of numbers", values) from None
    bounds = f"{'[' if include_low else '('}{low:g}, {high:g}]"
    if (array.ndim != 1 or len(array) < 1 or not np.isfinite(array).all() or np.any(np.diff(array) >= 0)
            or array.max() > high or array.min() < low or (not include_low and array.min() <= low)):
        hint = " (the final 0 is appended by the scheduler)" if name == "sigmas" else ""
        raise invalid(name, f"a non-empty, strictly descending sequence in {bounds}{hint}", array.tolist())
    return array.astype(np.float32)
