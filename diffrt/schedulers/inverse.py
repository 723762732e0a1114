"""Inversion schedulers: run a deterministic sampler backwards, from a clean latent up to noise (image editing:
DiffEdit, pix2pix-zero, null-text inversion), as Diffusers' ``DDIMInverseScheduler`` and
``DPMSolverMultistepInverseScheduler``.

Timesteps ascend. DDIM inversion (Song et al. 2021, eq. 13 read from t-1 to t; Mokady et al. 2022) reuses DDIM's
parameterisation; the DPM-Solver inversion is the multistep solver itself over an ascending sigma schedule, so its
update math, order logic and model-output conversion are inherited from ``dpm_solver.DPMSolverMultistepBase``.
Custom schedules (our extension) are ascending too: ``timesteps=`` integers from clean to noisy; ``sigmas=`` n + 1
values, so a forward schedule reversed inverts it (DDIM: the first value, the clean end, is implied by
``set_alpha_to_one`` and not used, as DDIM's final sigma is not; DPM-Solver: all are used, the last is the final).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, invalid
from .alpha_base import AlphaScheduler
from .base import (
    BETA_SCHEDULES,
    KARRAS_COMPATIBLES,
    TIMESTEP_SPACINGS,
    SchedulerOutput,
    alpha_space_x0_eps,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    freeze,
    register_config,
    sigma_schedule,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from .dpm_solver import (
    ALGORITHM_TYPES,
    DPM_PREDICTION_TYPES,
    SOLVER_TYPES,
    DPMSolverMultistepBase,
    dpm_spaced_timesteps,
    flow_sigmas,
)

INVERSE_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")


def check_inverse_set_timesteps(
    num_inference_steps: Any, timesteps: Any, sigmas: Any, num_train_timesteps: int, max_steps: int | None = None
) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """``check_set_timesteps`` for ascending schedules: exactly one argument; custom timesteps strictly ascending
    in [0, num_train_timesteps); custom sigmas (n + 1 values) >= 0 and strictly ascending, except that the final
    sigma may repeat the last one (a zero-length last step: how Diffusers' karras / exponential / beta inversions
    end). Returns (the step count, custom timesteps or None, custom sigmas or None), as ``check_set_timesteps``."""
    if timesteps is None and sigmas is None:
        return check_set_timesteps(num_inference_steps, None, None, num_train_timesteps, max_steps)
    if num_inference_steps is not None or (timesteps is not None and sigmas is not None):
        given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                ("sigmas", sigmas)) if v is not None]
        raise InputError(f"exactly one of `num_inference_steps`, `timesteps`, `sigmas` must be given; got {given}")
    name, values, minimum_len = ("timesteps", timesteps, 1) if timesteps is not None else ("sigmas", sigmas, 2)
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(name, "a sequence of numbers", values) from None
    valid = array.ndim == 1 and len(array) >= minimum_len and bool(np.isfinite(array).all())
    if valid and name == "sigmas":  # the final sigma may repeat the last one
        valid = bool(np.all(np.diff(array[:-1]) > 0)) and array[-1] >= array[-2]
    elif valid:
        valid = bool(np.all(np.diff(array) > 0))
    if not valid:
        repeat = " (the final sigma may repeat the last)" if name == "sigmas" else ""
        raise invalid(name, f"a 1-D strictly ascending sequence of at least {minimum_len} finite values{repeat}",
                      np.asarray(values).tolist())
    if name == "timesteps":
        if array[0] < 0 or array[-1] >= num_train_timesteps or not np.all(array == np.round(array)):
            raise invalid(name, f"integers within [0, {num_train_timesteps})", array.tolist())
        return len(array), array, None
    if array[0] < 0:
        raise invalid(name, "all >= 0", array.tolist())
    return len(array) - 1, None, array


# ------------------------------------------------------------------------------------------------------ DDIM
class DDIMInverseScheduler(AlphaScheduler):
    """Deterministic DDIM run from clean to noisy: at timestep t the model output predicts (x0, eps) at the
    previous, less noisy level, and the step re-noises that x0 to t. Beyond Diffusers: custom ascending
    ``timesteps=`` / ``sigmas=`` (the previous level is then the previous list entry), ``add_noise``."""

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
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        check_choice("timestep_spacing", timestep_spacing, ("leading", "trailing"))
        self._init_tables()
        # the level an inversion starts from: clean (1), or as some checkpoints have it, alpha-bar at t = 0
        self.initial_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = freeze(np.arange(0, num_train_timesteps, dtype=np.int64))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Ascending integer timesteps from a step count (``leading`` / ``trailing``), or custom timesteps /
        sigmas. ``device`` is accepted for API compatibility and ignored."""
        n_train = self.config.num_train_timesteps
        steps, custom, custom_sigmas = check_inverse_set_timesteps(num_inference_steps, timesteps, sigmas, n_train,
                                                                   max_steps=n_train)
        if custom_sigmas is not None:  # reversed, this is a forward DDIM sigma list: the same rule maps it
            custom = self._timesteps_from_sigmas(custom_sigmas[::-1])[::-1].copy()
        self.custom_timesteps = custom is not None
        if custom is not None:
            self.timesteps = freeze(custom.astype(np.int64))
            self.num_inference_steps = len(self.timesteps)
        else:
            self.timesteps = freeze(self._spaced_integer_timesteps(steps)[::-1].copy())
            self.num_inference_steps = steps
        self._reset_run_state()

    def _previous_level(self, timestep: int) -> int:
        """The less noisy timestep the step starts from (-1: the initial level). Step-count schedules keep
        Diffusers' t - T // n; custom ones take the previous entry."""
        if self.custom_timesteps:
            index = self.index_for_timestep(timestep)
            return int(self.timesteps[index - 1]) if index > 0 else -1
        step = self.config.num_train_timesteps // self.num_inference_steps
        return min(timestep - step, self.config.num_train_timesteps - 1)

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with (x0, eps) predicted at the previous level (DDIM, eta = 0)."""
        i = self._start_step(model_output, timestep)
        t = int(np.asarray(timestep).item())
        previous = self._previous_level(t)
        alpha_prod_t = self.alphas_cumprod[previous] if previous >= 0 else self.initial_alpha_cumprod
        alpha_next = self.alphas_cumprod[t]
        x0, eps = alpha_space_x0_eps(model_output, sample, alpha_prod_t, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        prev_sample = np.sqrt(alpha_next) * x0
        prev_sample += np.sqrt(np.float32(1) - alpha_next) * eps
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


# ---------------------------------------------------------------------------------------------- DPM-Solver
def inverse_spaced_timesteps(spacing: str, num_train_timesteps: int, noisiest: int, num_steps: int,
                             steps_offset: int = 0) -> np.ndarray:
    """Diffusers' ascending inversion timesteps: n + 1 points from 0 to ``noisiest`` (the lambda clip) with the
    noisiest dropped, so the last step lands on the final sigma; ``trailing`` keeps the training-length ratio."""
    if spacing == "trailing":
        return dpm_spaced_timesteps("trailing", num_train_timesteps, noisiest + 1, num_steps)[::-1].copy()
    ascending = spaced_timesteps(spacing, noisiest + 1, num_steps + 1, steps_offset)[::-1]
    return (ascending.round() if spacing == "linspace" else ascending)[:-1].copy()


class DPMSolverMultistepInverseScheduler(DPMSolverMultistepBase):
    """Multistep DPM-Solver / DPM-Solver++ of order 1-3 over an ascending schedule (the ODE forms: the SDE forms
    cannot step toward noise, see ``_check_config``).

    Diffusers' quirks kept for parity: karras / exponential / beta schedules end with a repeated sigma (a
    zero-length last step) and drop repeated timesteps but not their sigmas. Deviations, all where Diffusers
    returns NaN or fails: a zero-length step is taken at first order (exactly x unchanged; Diffusers' heun and
    third-order weights are 0 / 0 there); a run starts at the first occurrence of a repeated timestep; the SDE
    algorithm types are refused; ``use_flow_sigmas`` ascends (Diffusers reuses the forward flow schedule, which
    denoises). Beyond Diffusers: custom ascending ``timesteps=`` / ``sigmas=``."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1
    init_noise_sigma = 1.0

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._apply_aliases(algorithm_type, solver_type)
        self._check_config()
        _, _, alphas_cumprod = alphas_cumprod_from_config(self.config, BETA_SCHEDULES)
        self.alphas_cumprod = freeze(alphas_cumprod)
        self.train_sigmas = freeze(sigmas_from_alphas_cumprod(alphas_cumprod))  # ascending in t
        self.log_sigmas = freeze(np.log(self.train_sigmas))
        self.num_inference_steps: int | None = None
        # before set_timesteps: every training step, ascending, each with its own sigma
        self.timesteps = freeze(np.arange(num_train_timesteps, dtype=np.int64))
        self.sigmas = self.train_sigmas
        self._reset_run_state()

    def _check_config(self) -> None:
        cfg = self.config
        check_choice("algorithm_type", cfg.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", cfg.solver_type, SOLVER_TYPES)
        check_choice("solver_order", cfg.solver_order, (1, 2, 3))
        check_choice("prediction_type", cfg.prediction_type, DPM_PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("variance_type", cfg.variance_type, (None, "learned", "learned_range"))
        flags = [k for k in INVERSE_SCHEDULE_FLAGS if cfg.get(k)]
        if len(flags) > 1:
            raise invalid(" / ".join(INVERSE_SCHEDULE_FLAGS), "at most one True", flags, ConfigError)
        if cfg.algorithm_type.startswith("sde-"):  # Diffusers accepts them and returns NaN from the first step
            raise invalid("algorithm_type", "'dpmsolver++' or 'dpmsolver' for inversion (the SDE variants' noise "
                          "scale sigma_t sqrt(1 - e^(-2h)) is imaginary for steps toward noise, h < 0)",
                          cfg.algorithm_type, ConfigError)
        if cfg.algorithm_type == "dpmsolver" and cfg.prediction_type == "flow_prediction":
            raise invalid("prediction_type", f"not 'flow_prediction' for algorithm_type {cfg.algorithm_type!r}",
                          cfg.prediction_type, ConfigError)

    def _init_step_index(self, timestep: Any) -> int:
        """A run starts at the first occurrence of its timestep. Diffusers takes the second when it repeats (its
        img2img rule), and truncated exponential / beta timesteps repeat at the clean end: it then skips a sigma
        and runs off the end of the schedule."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return self._step_index
        matches = np.flatnonzero(self.timesteps == np.asarray(timestep).item())
        if len(matches) == 0:
            raise invalid("timestep", "one of the scheduler's timesteps", np.asarray(timestep).item())
        self._step_index = int(matches[0])
        return self._step_index

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Ascending schedule from a step count, custom integer timesteps (final sigma: the noisiest timestep's)
        or custom sigmas (n + 1 values, the last the final sigma). ``device`` is ignored."""
        cfg = self.config
        steps, custom_t, custom_s = check_inverse_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                                cfg.num_train_timesteps)
        if custom_t is not None:
            flag = next((k for k in INVERSE_SCHEDULE_FLAGS if cfg.get(k)), None)
            if flag:
                raise invalid("timesteps", f"None with `{flag}` = True (pass `sigmas` instead)", custom_t.tolist())
            noisiest = self._last_timestep() - 1
            if custom_t[-1] > noisiest:  # the final sigma is the noisiest timestep's: the last step would go back
                raise invalid("timesteps", f"at most {noisiest} (the noisiest timestep within lambda_min_clipped)",
                              custom_t.tolist())
            times, full = custom_t, self._with_noisiest(self._interp(custom_t))
        elif custom_s is not None:
            times, full = self._custom_sigma_schedule(custom_s)
        else:
            times, full = self._step_schedule(steps)
        _, first = np.unique(times, return_index=True)  # Diffusers drops repeated timesteps, not their sigmas
        self.timesteps = freeze(np.asarray(times)[np.sort(first)].astype(np.int64))
        self.sigmas = freeze(full)
        self.num_inference_steps = len(self.timesteps)
        self._reset_run_state()

    def _interp(self, times: np.ndarray) -> np.ndarray:
        return np.interp(times, np.arange(len(self.train_sigmas)), self.train_sigmas)

    def _with_noisiest(self, sigmas: np.ndarray) -> np.ndarray:
        """Append the final sigma, that of the noisiest timestep below the lambda clip, as float32."""
        return np.append(sigmas, self.train_sigmas[self._last_timestep() - 1]).astype(np.float32)

    def _step_schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Diffusers' order: karras / exponential / beta sigmas over the ascending training range (timesteps by
        sigma -> t, Karras' rounded), closed by their last sigma repeated; else spaced timesteps up to the lambda
        clip with the noisiest sigma last. Flow sigmas: the forward flow schedule reversed, last one repeated."""
        cfg = self.config
        if cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_steps, cfg.num_train_timesteps, cfg.flow_shift)[::-1]
            return sigmas * cfg.num_train_timesteps, np.append(sigmas, sigmas[-1]).astype(np.float32)
        sigmas = sigma_schedule(cfg, self.train_sigmas, num_steps)
        if sigmas is not self.train_sigmas:
            times = sigma_to_t(sigmas, self.log_sigmas)
            return (times.round() if cfg.use_karras_sigmas else times), np.append(sigmas, sigmas[-1]).astype(
                np.float32)
        times = inverse_spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, self._last_timestep() - 1,
                                         num_steps, cfg.steps_offset).astype(np.int64)
        return times, self._with_noisiest(self._interp(times))

    def _custom_sigma_schedule(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Timesteps by sigma -> t rounded to the nearest training step (flow: sigma * N)."""
        if sigmas[0] <= 0:  # every update divides by the start's sigma (or its log)
            raise invalid("sigmas", "> 0 at the start (an inversion cannot step from sigma 0)", sigmas.tolist())
        if self.config.use_flow_sigmas:
            if sigmas[-1] >= 1:
                raise invalid("sigmas", "below 1 with `use_flow_sigmas` (sigma 1 is pure noise)", sigmas.tolist())
            return sigmas[:-1] * self.config.num_train_timesteps, sigmas.astype(np.float32)
        return sigma_to_t(sigmas[:-1], self.log_sigmas).round(), sigmas.astype(np.float32)
