"""Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927, Algorithms 1-2 and their third-order
form; arXiv:2211.01095, Algorithm 1) with Diffusers' ``DPMSolverSinglestepScheduler`` API and config.

A singlestep solver of order k spends k model calls on one step of length h from an anchor sample: the calls at
the intermediate noise levels only refine the derivative estimates, and each intermediate result is thrown away
once the group ends. Diffusers lays the groups over the schedule through an order list ([1, 2, 1, 2, ...] for
order 2), so every call advances one schedule entry and the k-th call of a group jumps from the anchor. The update
rules are ``dpm_solver``'s exponential-integrator coefficients; only the derivative estimates differ, anchored at
the oldest point of the group (``singlestep_derivatives``).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, InputError, invalid
from .base import (
    BETA_SCHEDULES,
    KARRAS_COMPATIBLES,
    SchedulerOutput,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    freeze,
    register_config,
    sigma_schedule,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from .dpm_solver import (
    DPM_PREDICTION_TYPES,
    SOLVER_TYPES,
    DPMSolverBase,
    ForwardScheduleMixin,
    NoiseLevel,
    dpm_spaced_timesteps,
    exponential_integrator_step,
    flow_sigmas,
    recent_outputs,
)

logger = logging.getLogger(__name__)

SINGLESTEP_ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")
SINGLESTEP_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")


def singlestep_orders(num_steps: int, solver_order: int, lower_order_final: bool,
                      final_sigma_zero: bool) -> tuple[int, ...]:
    """The order of each call (Diffusers' ``get_order_list``): repeated groups [1, .., k]; with
    ``lower_order_final`` the tail is closed by a shorter group so the last group never overshoots; a step to
    sigma 0 is always first order."""
    k, n = solver_order, num_steps
    group = list(range(1, k + 1))
    if not lower_order_final:
        orders = group * (n // k)
    elif k == 1:
        orders = [1] * n
    elif k == 2:
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        tails = {0: [1, 2, 1], 1: [1], 2: [1, 2]}  # what is left after the last full group
        orders = group * (n // 3 - (1 if n % 3 == 0 else 0)) + tails[n % 3]
    if final_sigma_zero:
        orders[-1] = 1
    return tuple(orders)


def singlestep_derivatives(outputs: Sequence[np.ndarray], t: NoiseLevel, levels: Sequence[NoiseLevel],
                           solver_type: str) -> tuple[list[np.ndarray], str]:
    """(derivatives, D1 weight rule) for a group step to ``t`` from the anchor ``levels[0]``; ``outputs`` and
    ``levels`` run oldest (the anchor) first. Differences are taken against the anchor's output, in lambda scaled
    by the step h = lambda_t - lambda_anchor (Lu et al. 2022a, Algorithms 1 and 2). Third order uses the phi_2
    weight for D1; its "midpoint" variant keeps only the difference to the newest point (DPM-Solver-3, Alg. 2)."""
    if len(outputs) == 1:
        return [outputs[0]], solver_type
    anchor = levels[0]
    h = t.lam - anchor.lam
    if len(outputs) == 2:
        r0 = (levels[1].lam - anchor.lam) / h
        return [outputs[0], (1.0 / r0) * (outputs[1] - outputs[0])], solver_type
    m2, m1, m0 = outputs
    r0, r1 = (levels[2].lam - anchor.lam) / h, (levels[1].lam - anchor.lam) / h
    d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
    if solver_type == "midpoint":
        return [m2, d1_1], "heun"
    d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
    d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
    return [m2, d1, d2], "heun"


class DPMSolverSinglestepScheduler(ForwardScheduleMixin, DPMSolverBase):
    """Singlestep DPM-Solver / DPM-Solver++ / SDE-DPM-Solver++ of order 1-3.

    Beyond Diffusers: custom ``sigmas=`` (n steps -> n + 1 values, the last the final sigma); ``lower_order_final``
    is decided per schedule and never written back into the config (Diffusers flips it to True for good on the
    first uneven step count or zero final sigma); ``mu`` shifts only the schedule it is passed with;
    ``algorithm_type="dpmsolver"`` with ``thresholding`` works (Diffusers indexes its tables with ``None`` there
    and fails); ``variance_type`` drops the second half of the channels for every prediction type."""

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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        self._apply_aliases(algorithm_type, solver_type)
        self._check_config()
        _, _, alphas_cumprod = alphas_cumprod_from_config(self.config, BETA_SCHEDULES)
        self.alphas_cumprod = freeze(alphas_cumprod)
        self.train_sigmas = freeze(sigmas_from_alphas_cumprod(alphas_cumprod))  # ascending in t
        self.log_sigmas = freeze(np.log(self.train_sigmas))
        self.num_inference_steps: int | None = None
        # before set_timesteps: every training step, descending, each with its own sigma
        self.timesteps = freeze(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64))
        self.sigmas = freeze(self.train_sigmas[::-1].copy())
        self.order_list: tuple[int, ...] = ()
        self._reset_run_state()

    def _check_config(self) -> None:
        cfg = self.config
        check_choice("algorithm_type", cfg.algorithm_type, SINGLESTEP_ALGORITHM_TYPES)
        check_choice("solver_type", cfg.solver_type, SOLVER_TYPES)
        check_choice("solver_order", cfg.solver_order, (1, 2, 3))
        check_choice("prediction_type", cfg.prediction_type, DPM_PREDICTION_TYPES)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        check_choice("variance_type", cfg.variance_type, (None, "learned", "learned_range"))
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential",))
        flags = [k for k in SINGLESTEP_SCHEDULE_FLAGS if cfg.get(k)]
        if len(flags) > 1:
            raise invalid(" / ".join(SINGLESTEP_SCHEDULE_FLAGS), "at most one True", flags, ConfigError)
        if cfg.algorithm_type == "dpmsolver":
            if cfg.final_sigmas_type == "zero":  # the eps-form update is undefined at sigma = 0
                raise invalid("final_sigmas_type", "'sigma_min' for algorithm_type 'dpmsolver'",
                              cfg.final_sigmas_type, ConfigError)
            if cfg.prediction_type == "flow_prediction":
                raise invalid("prediction_type", "not 'flow_prediction' for algorithm_type 'dpmsolver'",
                              cfg.prediction_type, ConfigError)

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.model_outputs: list[np.ndarray | None] = [None] * self.config.solver_order
        self.sample: np.ndarray | None = None  # the anchor of the current group

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Build the schedule from a step count, custom integer timesteps (as Diffusers) or custom sigmas (ours:
        n + 1 values, the last the final sigma), and the order of each call. ``device`` is ignored."""
        steps, custom_t, custom_s = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                        self.config.num_train_timesteps)
        shift = self._flow_shift(mu)
        if custom_t is not None:
            flag = next((k for k in SINGLESTEP_SCHEDULE_FLAGS if self.config.get(k)), None)
            if flag:
                raise invalid("timesteps", f"None with `{flag}` = True (pass `sigmas` instead)", custom_t.tolist())
            times = custom_t.astype(np.int64)
            full = self._with_final(np.interp(times, np.arange(len(self.train_sigmas)), self.train_sigmas))
        elif custom_s is not None:
            times, full = self._custom_sigma_schedule(custom_s)
        else:
            times, full = self._step_schedule(steps, shift)
        self.timesteps = freeze(np.asarray(times).astype(np.int64))
        self.sigmas = freeze(full)
        self.num_inference_steps = len(self.timesteps)
        self.order_list = self._orders(self.num_inference_steps)
        self._reset_run_state()

    def _orders(self, num_steps: int) -> tuple[int, ...]:
        """Diffusers forces ``lower_order_final`` when the groups do not tile the steps or the last step goes to
        sigma 0; we apply that to this schedule only."""
        cfg = self.config
        final_zero = cfg.final_sigmas_type == "zero"
        lower = cfg.lower_order_final or num_steps % cfg.solver_order != 0 or final_zero
        if lower and not cfg.lower_order_final:
            logger.debug("lower_order_final applies to this %d-step schedule (uneven groups or final sigma 0)",
                         num_steps)
        return singlestep_orders(num_steps, cfg.solver_order, lower, final_zero)

    def _step_schedule(self, num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) as Diffusers builds them: linspace below the lambda clip, or karras / exponential /
        beta sigmas over the training range (timesteps by sigma -> t, Karras' rounded, the others truncated), or
        flow sigmas; then the final sigma."""
        cfg = self.config
        if cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_steps, cfg.num_train_timesteps, shift)
            return sigmas * cfg.num_train_timesteps, self._with_final(sigmas)
        descending = self.train_sigmas[::-1]
        sigmas = sigma_schedule(cfg, descending, num_steps)
        if sigmas is not descending:
            times = sigma_to_t(sigmas, self.log_sigmas)
            return (times.round() if cfg.use_karras_sigmas else times), self._with_final(sigmas)
        times = dpm_spaced_timesteps("linspace", cfg.num_train_timesteps, self._last_timestep(), num_steps)
        times = times.astype(np.int64)
        return times, self._with_final(np.interp(times, np.arange(len(self.train_sigmas)), self.train_sigmas))

    # ---- per-step
    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One call of the current group: record the converted output; the group's k-th call steps from the
        anchor sample to sigma_{i+1}. SDE-DPM-Solver++ draws noise from ``generator`` on every call (or takes
        ``variance_noise``), as Diffusers does. Computed in float32; the result has the model output's dtype."""
        i = self._start_step(model_output, timestep)
        if i >= len(self.order_list):  # e.g. a repeated first timestep (Diffusers' 2nd-match rule)
            raise InputError(f"`step` was called past the end of the {len(self.order_list)}-step schedule; "
                             "call `set_timesteps` to start a new run")
        x = sample.astype(np.float32, copy=False)
        converted = self.convert_model_output(model_output, x)
        self.model_outputs = self.model_outputs[1:] + [converted]
        noise = self._noise(converted.shape, generator, variance_noise)
        order = self.order_list[i]
        while self.model_outputs[-order] is None:  # img2img may start inside a group
            order -= 1
        anchor = x if order == 1 else self.sample  # a group's first call starts it from this sample
        if anchor is None:
            raise InputError("this step continues a group whose first call the run has not made; call "
                             "`set_timesteps` to start a new run")
        self.sample = anchor
        levels = [self._level(i - k) for k in range(order - 1, -1, -1)]  # the anchor first
        target = self._level(i + 1)
        derivatives, d1_rule = singlestep_derivatives(recent_outputs(self.model_outputs, order), target, levels,
                                                      self.config.solver_type)
        prev_sample = exponential_integrator_step(anchor, derivatives, target, levels[0],
                                                  self.config.algorithm_type, d1_rule, noise)
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        pred_original_sample = converted
        if self.config.algorithm_type == "dpmsolver":
            pred_original_sample = (x - levels[-1].sigma * converted) / levels[-1].alpha
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
