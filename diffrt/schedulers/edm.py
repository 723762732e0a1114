"""EDM samplers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), with
Diffusers' ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler`` API and config.

EDM parameterises the denoiser by sigma directly: the model sees c_in(sigma) x and c_noise = log(sigma) / 4 (the
timesteps are c_noise), and its output becomes x0 = c_skip x + c_out F (paper, Table 1, with ``sigma_data``).
The update rules are the ones we already have: Euler's from ``euler.py`` and DPM-Solver++'s from ``dpm_solver.py``
on the path x = x0 + sigma eps (alpha = 1, lambda = -log sigma).
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, invalid
from .base import (
    FrozenConfig,
    SchedulerBase,
    SchedulerOutput,
    check_choice,
    check_set_timesteps,
    draw_noise,
    dynamic_threshold,
    freeze,
    register_config,
    torch_linspace_f32,
)
from .dpm_solver import SOLVER_TYPES, DPMSolverMultistepBase, NoiseLevel
from .sigma_base import SigmaScheduler, add_sigma_noise, euler_update

logger = logging.getLogger(__name__)

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
SIGMA_SCHEDULES = ("karras", "exponential")
EDM_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++")
EDM_DEFAULTS = {"sigma_min": 0.002, "sigma_max": 80.0}  # the paper's range, Table 1


# ----------------------------------------------------------------------------------------------- sigma schedules
def karras_ramp_sigmas(ramp: np.ndarray, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """Karras et al. 2022, eq. 5, at ramp positions in [0, 1] (0 -> sigma_max), in the ramp's dtype (EDM Euler
    builds it in float64, EDM DPM-Solver in float32, as Diffusers does)."""
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def edm_exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Evenly spaced in log sigma, descending, in float32 (Diffusers' EDM variant, used by CosXL, takes a
    float32 linspace from the low end and flips it, so its values differ from k-diffusion's in the last bits).
    exp is taken in float64 and rounded once: torch's float32 exp is within an ulp of that, NumPy's further off."""
    log_sigmas = torch_linspace_f32(math.log(sigma_min), math.log(sigma_max), num_steps).astype(np.float64)
    return np.exp(log_sigmas).astype(np.float32)[::-1].copy()


# ---------------------------------------------------------------------------------------------- preconditioning
def precondition_noise(sigma: Any) -> np.ndarray:
    """c_noise = log(sigma) / 4: the timestep an EDM model is conditioned on. The float32 sigma's log is taken in
    float64 and rounded once; torch's (MKL VML, not correctly rounded) can differ by an ulp."""
    log_sigma = np.log(np.asarray(sigma, dtype=np.float32).astype(np.float64)).astype(np.float32)
    return np.float32(0.25) * log_sigma


def precondition_inputs(sample: np.ndarray, sigma: np.float32, sigma_data: float) -> np.ndarray:
    """c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2) (unit-variance model input)."""
    c_in = np.float32(1) / np.sqrt(sigma * sigma + np.float32(sigma_data**2))
    return sample * c_in


def precondition_outputs(sample: np.ndarray, model_output: np.ndarray, sigma: np.float32, sigma_data: float,
                         prediction_type: str) -> np.ndarray:
    """x0 = c_skip x + c_out F, float32 in torch's operation order (a scalar divided by a tensor is a reciprocal
    times the scalar there). Diffusers' (.) ** 0.5 is torch's float32 pow, not always correctly rounded, so the
    coefficients can differ from ours by an ulp."""
    variance = sigma * sigma + np.float32(sigma_data**2)
    c_skip = (np.float32(1) / variance) * np.float32(sigma_data**2)
    if prediction_type == "epsilon":
        c_out = sigma * np.float32(sigma_data) / np.sqrt(variance)
    elif prediction_type == "v_prediction":
        c_out = -sigma * np.float32(sigma_data) / np.sqrt(variance)
    else:
        raise invalid("prediction_type", "one of " + ", ".join(map(repr, EDM_PREDICTION_TYPES)), prediction_type,
                      ConfigError)
    return c_skip * sample + c_out * model_output


def check_ramp(ramp: Any) -> np.ndarray:
    """Custom ``sigmas`` for EDM Euler are, as in Diffusers, positions in [0, 1] along the configured schedule
    (0 -> sigma_max, 1 -> sigma_min), not sigma values."""
    try:
        values = np.asarray(ramp, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid("sigmas", "a sequence of ramp positions in [0, 1]", ramp) from None
    if values.ndim != 1 or len(values) < 1:
        raise invalid("sigmas", "a 1-D sequence of ramp positions in [0, 1]", values.tolist())
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1 or np.any(np.diff(values) <= 0):
        raise invalid("sigmas", "strictly ascending ramp positions in [0, 1] (EDM maps them through "
                      "`sigma_schedule`; 0 is sigma_max)", values.tolist())
    return values


def reject_custom_timesteps(timesteps: Any) -> None:
    """EDM timesteps are c_noise of the sigmas; Diffusers takes no custom ones, nor do we (the shared
    ``set_timesteps`` signature accepts the keyword so the refusal names it)."""
    if timesteps is not None:
        raise invalid("timesteps", "None for EDM schedulers (their timesteps are log(sigma) / 4 of the sigma "
                      "schedule)", np.asarray(timesteps).tolist())


# ------------------------------------------------------------------------------------------------ shared EDM parts
class EDMPreconditioning(SchedulerBase):
    """Config checks, sigma schedule, c_in / c_noise / c_skip / c_out and ``add_noise`` of both EDM schedulers."""

    sigmas: np.ndarray
    is_scale_input_called: bool

    def _check_edm_config(self) -> None:
        """``sigma_min`` / ``sigma_max`` of None (as Euler-family configs carry) read as the EDM defaults and are
        recorded so; Diffusers would fail on them at the first schedule."""
        resolved = {k: v for k, v in EDM_DEFAULTS.items() if self.config[k] is None}
        if resolved:
            logger.debug("%s: %s None -> EDM defaults %s", type(self).__name__, sorted(resolved), resolved)
            self._config = FrozenConfig({**self.config, **resolved}, self.config.defaulted)
        cfg = self.config
        check_choice("sigma_schedule", cfg.sigma_schedule, SIGMA_SCHEDULES)
        check_choice("prediction_type", cfg.prediction_type, EDM_PREDICTION_TYPES)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise invalid("sigma_min / sigma_max", "0 < sigma_min < sigma_max", (cfg.sigma_min, cfg.sigma_max),
                          ConfigError)
        if not cfg.sigma_data > 0 or not cfg.rho > 0:
            raise invalid("sigma_data / rho", "both > 0", (cfg.sigma_data, cfg.rho), ConfigError)

    def _edm_sigmas(self, ramp: np.ndarray) -> np.ndarray:
        """Float32 sigmas of the configured schedule at ``ramp`` (exponential uses only its length)."""
        cfg = self.config
        if cfg.sigma_schedule == "karras":
            return karras_ramp_sigmas(ramp, cfg.sigma_min, cfg.sigma_max, cfg.rho).astype(np.float32)
        return edm_exponential_sigmas(cfg.sigma_min, cfg.sigma_max, len(ramp))

    @property
    def init_noise_sigma(self) -> float:
        """sqrt(sigma_max^2 + 1), from the config, as Diffusers computes it."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    def precondition_inputs(self, sample: np.ndarray, sigma: Any) -> np.ndarray:
        return precondition_inputs(sample, np.float32(sigma), self.config.sigma_data)

    def precondition_noise(self, sigma: Any) -> np.ndarray:
        return precondition_noise(sigma)

    def precondition_outputs(self, sample: np.ndarray, model_output: np.ndarray, sigma: Any) -> np.ndarray:
        return precondition_outputs(sample, model_output, np.float32(sigma), self.config.sigma_data,
                                    self.config.prediction_type)

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """c_in x at the current step's sigma."""
        i = self._current_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[i])

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """x0 + sigma noise: EDM's forward process in sigma space (also under the DPM-Solver variant)."""
        return add_sigma_noise(self, original_samples, noise, timesteps)


# ---------------------------------------------------------------------------------------------------- EDM Euler
class EDMEulerScheduler(EDMPreconditioning, SigmaScheduler):
    """Euler on the EDM probability-flow ODE, with optional churn (Karras et al. 2022, Algorithm 2).

    ``set_timesteps(sigmas=...)`` takes, as in Diffusers, ramp positions in [0, 1] along ``sigma_schedule``."""

    _compatibles: tuple[str, ...] = ()
    order = 1

    @register_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ) -> None:
        self._check_edm_config()
        self.num_inference_steps: int | None = None
        self._install(np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps)
        self._reset_run_state()

    def _install(self, ramp: np.ndarray) -> None:
        sigmas = self._edm_sigmas(ramp)
        final = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else np.float32(0)
        self.timesteps = freeze(precondition_noise(sigmas))
        self.sigmas = freeze(np.concatenate([sigmas, [final]]).astype(np.float32))

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, sigmas: Any = None,
                      timesteps: Any = None) -> None:
        """Schedule of ``num_inference_steps`` sigmas from sigma_max to sigma_min, or at custom ramp positions
        (``sigmas``, see the class docstring), then the final sigma. ``device`` is ignored (NumPy)."""
        reject_custom_timesteps(timesteps)
        if (num_inference_steps is None) == (sigmas is None):
            raise InputError("exactly one of `num_inference_steps`, `sigmas` must be given; got "
                             f"{'both' if sigmas is not None else 'none'}")
        if sigmas is None:
            steps, _, _ = check_set_timesteps(num_inference_steps, None, None, self.config.num_train_timesteps)
            ramp = np.linspace(0, 1, steps)
        else:
            ramp = check_ramp(sigmas)
        self.num_inference_steps = len(ramp)
        self._install(ramp)
        self._reset_run_state()

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
        pred_original_sample: np.ndarray | None = None,
    ) -> SchedulerOutput | tuple:
        """One Euler step sigma_i -> sigma_{i+1} on x0 = c_skip x + c_out F; with ``s_churn`` > 0 the noise level
        is first raised to sigma_hat = sigma (1 + gamma) with fresh noise. A given ``pred_original_sample`` is used
        instead of the model's."""
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        sigma = self.sigmas[i]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * np.float32(gamma + 1)
        if gamma > 0:
            eps = draw_noise(model_output.shape, generator, model_output.dtype) * np.float32(s_noise)
            sample = sample + eps * np.sqrt(sigma_hat * sigma_hat - sigma * sigma)
        if pred_original_sample is None:
            pred_original_sample = self.precondition_outputs(sample, model_output, sigma_hat)
        prev_sample = euler_update(sample, pred_original_sample, sigma_hat, self.sigmas[i + 1])
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# --------------------------------------------------------------------------------------------- EDM DPM-Solver++
class EDMDPMSolverMultistepScheduler(EDMPreconditioning, DPMSolverMultistepBase):
    """DPM-Solver++ (orders 1-3, ODE or SDE) on the EDM schedule: DPM-Solver's step with alpha = 1 and
    lambda = -log sigma, and x0 from the EDM preconditioning (CosXL, Playground v2.5).

    Like our DPM-Solver, a zero-length step (``final_sigmas_type="sigma_min"`` ends on sigma_min twice) is taken
    at first order, its exact result; Diffusers' heun rule divides 0 by 0 there. ``sde-dpmsolver++`` is limited to
    solver_order 1-2: Diffusers' EDM variant has no third-order SDE update and fails mid-run."""

    _compatibles: tuple[str, ...] = ()
    order = 1

    @register_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ) -> None:
        self._apply_aliases(algorithm_type, solver_type)  # DEIS / UniPC solver names, as DPM-Solver maps them
        self._check_edm_config()
        cfg = self.config
        check_choice("algorithm_type", cfg.algorithm_type, EDM_ALGORITHM_TYPES)
        check_choice("solver_type", cfg.solver_type, SOLVER_TYPES)
        check_choice("solver_order", cfg.solver_order, (1, 2, 3))
        if cfg.algorithm_type == "sde-dpmsolver++" and cfg.solver_order == 3:
            raise invalid("solver_order", "1 or 2 for algorithm_type 'sde-dpmsolver++'", 3, ConfigError)
        sigmas = self._edm_sigmas(torch_linspace_f32(0, 1, num_train_timesteps))
        self.timesteps = freeze(precondition_noise(sigmas))
        self.sigmas = freeze(np.concatenate([sigmas, np.zeros(1, np.float32)]))
        self.num_inference_steps: int | None = None
        self.is_scale_input_called = False
        self._reset_run_state()

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, timesteps: Any = None,
                      sigmas: Any = None) -> None:
        """``num_inference_steps`` sigmas from sigma_max to sigma_min, then 0 or ``sigma_min``. ``device`` is
        ignored (NumPy). ``timesteps`` / ``sigmas`` are accepted only to be refused by name, as Diffusers' EDM
        DPM-Solver has no custom schedules."""
        reject_custom_timesteps(timesteps)
        if sigmas is not None:
            raise invalid("sigmas", "None (EDM DPM-Solver builds its schedule from `num_inference_steps`)",
                          np.asarray(sigmas).tolist())
        if num_inference_steps is None:
            raise invalid("num_inference_steps", "an int >= 1", None)
        steps, _, _ = check_set_timesteps(num_inference_steps, None, None, self.config.num_train_timesteps)
        sigmas = self._edm_sigmas(torch_linspace_f32(0, 1, steps))
        final = np.float32(self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0)
        self.timesteps = freeze(precondition_noise(sigmas))
        self.sigmas = freeze(np.concatenate([sigmas, [final]]).astype(np.float32))
        self.num_inference_steps = steps
        self._reset_run_state()

    def _level(self, index: int) -> NoiseLevel:
        """EDM inputs are not scaled by alpha: alpha = 1, sigma_t = sigma, lambda = -log sigma (+inf at 0)."""
        sigma = np.float32(self.sigmas[index])
        with np.errstate(divide="ignore"):
            return NoiseLevel(np.float32(1), sigma, np.float32(0) - np.log(sigma))

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 from the EDM preconditioning, dynamically thresholded when configured (Saharia et al. 2022)."""
        x0 = self.precondition_outputs(sample, model_output, self.sigmas[self._active_step_index()])
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0
