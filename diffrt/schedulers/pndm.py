"""Pseudo numerical methods for diffusion models (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models
on Manifolds", PNDM) as Diffusers' ``PNDMScheduler``.

Every update is the paper's transfer x_t -> x_{t-delta} (eq. 9) applied with an eps estimate; the methods differ
in that estimate. PRK (pseudo Runge-Kutta) warms up over the first three intervals with four model calls each at
t, t - delta/2, t - delta/2, t - delta; PLMS (pseudo linear multistep, eq. 12) then combines the last four eps.
With ``skip_prk_steps`` (Stable Diffusion's setting) PLMS starts itself: a pseudo-Heun step (the first interval
twice), then Adams-Bashforth of orders 2, 3, 4. The schedule mirrors Diffusers', repeated timesteps included.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError, invalid
from .alpha_base import AlphaScheduler
from .base import (
    BETA_SCHEDULES,
    KARRAS_COMPATIBLES,
    SchedulerOutput,
    check_choice,
    freeze,
    register_config,
)

PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
PRK_STEPS = 4  # the PRK warm-up covers the last four spaced timesteps (three intervals)


def pndm_transfer(sample: np.ndarray, eps: np.ndarray, alpha_t: np.float32, alpha_prev: np.float32) -> np.ndarray:
    """PNDM eq. 9: x_{t-delta} = sqrt(a'/a) x_t - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a')), with
    a = alpha-bar at t and a' at t - delta, in float32 and Diffusers' operation order."""
    beta_t, beta_prev = np.float32(1) - alpha_t, np.float32(1) - alpha_prev
    sample_coeff = np.sqrt(alpha_prev / alpha_t)
    denominator = alpha_t * np.sqrt(beta_prev) + np.sqrt(alpha_t * beta_t * alpha_prev)
    return sample_coeff * sample - (alpha_prev - alpha_t) * eps / denominator


def plms_eps(history: list[np.ndarray]) -> np.ndarray:
    """Adams-Bashforth combination of the newest eps (last in ``history``): orders 2, 3, 4 by history length."""
    e = history[::-1]
    if len(history) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(history) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


class PNDMScheduler(AlphaScheduler):
    """PRK warm-up + PLMS, or PLMS alone with ``skip_prk_steps``. Beyond Diffusers: custom ``timesteps=`` and
    ``sigmas=`` (PLMS only), each step moving to the next entry of the list; ``set_begin_index`` (PLMS only:
    it restarts itself from any timestep, so img2img works as in Diffusers, which has no such method)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1
    pndm_order = PRK_STEPS

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ) -> None:
        check_choice("prediction_type", prediction_type, PNDM_PREDICTION_TYPES)
        self._init_tables(BETA_SCHEDULES)
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = np.zeros(0, np.int64)
        self.plms_timesteps = np.zeros(0, np.int64)
        self._custom: np.ndarray | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.counter = 0
        self.ets: list[np.ndarray] = []
        self.cur_model_output: np.ndarray | int = 0
        self.cur_sample: np.ndarray | None = None

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Diffusers' PRK + PLMS list from a step count, or a PLMS list over custom timesteps / sigmas (these need
        ``skip_prk_steps``: PRK's half steps are defined on an evenly spaced schedule only). ``device`` is
        accepted for API compatibility and ignored."""
        if not self.config.skip_prk_steps:
            for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
                if value is not None:
                    raise invalid(name, "None unless skip_prk_steps=True (PRK needs an evenly spaced schedule)",
                                  np.asarray(value).tolist())
            if isinstance(num_inference_steps, (int, np.integer)) and 1 <= num_inference_steps < PRK_STEPS:
                raise invalid("num_inference_steps", f">= {PRK_STEPS} with skip_prk_steps=False (PRK warms up over "
                              f"the first {PRK_STEPS} timesteps)", num_inference_steps)
        steps, custom = self._parse_schedule(num_inference_steps, timesteps, sigmas)
        self._custom = None if custom is None else freeze(custom)
        self.custom_timesteps = custom is not None
        if custom is not None:
            self.num_inference_steps = len(custom)
            ascending = custom[::-1]
        else:
            self.num_inference_steps = steps
            ascending = self._spaced_integer_timesteps(steps)[::-1]
        if self.config.skip_prk_steps:
            self.prk_timesteps = np.zeros(0, np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        else:
            half = self.config.num_train_timesteps // steps // 2
            prk = np.array(ascending[-PRK_STEPS:]).repeat(2) + np.tile(np.array([0, half]), PRK_STEPS)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ascending[:-3][::-1].copy()
        self.timesteps = freeze(np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64))
        self._reset_run_state()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index and not self.config.skip_prk_steps:
            raise invalid("begin_index", "0 with skip_prk_steps=False (the PRK warm-up must start the schedule)",
                          begin_index)
        super().set_begin_index(begin_index)

    def _interval(self) -> int:
        return self.config.num_train_timesteps // self.num_inference_steps

    def _after(self, t: int) -> int:
        """The timestep a PLMS step at ``t`` moves to: t - T // n (Diffusers), or the next custom entry."""
        if self._custom is None:
            return t - self._interval()
        later = self._custom[self._custom < t]
        return int(later[0]) if len(later) else -1

    def _before(self, t: int) -> int:
        """The timestep the pseudo-Heun correction restarts from: t + T // n, or the previous custom entry."""
        if self._custom is None:
            return t + self._interval()
        earlier = self._custom[self._custom > t]
        return int(earlier[-1]) if len(earlier) else t

    # ---- steps
    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One model call's update: a PRK stage during the warm-up, a PLMS step after it."""
        t, i = self._check_step(model_output, timestep)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._step_prk(model_output, t, sample)
        else:
            prev_sample = self._step_plms(model_output, t, sample)
        self.counter += 1
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _check_step(self, model_output: np.ndarray, timestep: Any) -> tuple[int, int]:
        """(the integer timestep, the step index), after the checks every step makes."""
        value = np.asarray(timestep)
        if value.size != 1 or value.item() != round(value.item()):
            raise invalid("timestep", "an integer training timestep", timestep)
        t = int(round(value.item()))
        if not 0 <= t < self.config.num_train_timesteps:
            raise invalid("timestep", f"in [0, {self.config.num_train_timesteps})", t)
        if self._step_index is None:  # the counter, not a lookup, places us: PNDM's timesteps repeat
            self._step_index = self._begin_index or 0
        return t, self._start_step(model_output, timestep)

    def _step_prk(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """Stage ``counter % 4`` of the RK4 interval that starts at ``prk_timesteps[counter // 4 * 4]``: each stage
        moves the interval's starting sample with its own eps; the last with the weighted mean (1, 2, 2, 1) / 6."""
        stage = self.counter % 4
        prev_t = t - (0 if self.counter % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2)
        base_t = int(self.prk_timesteps[self.counter // 4 * 4])
        if stage == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        else:
            model_output = self.cur_model_output + (1 / 6) * model_output
            self.cur_model_output = 0
        base = self.cur_sample if self.cur_sample is not None else sample
        return self._transfer(base, base_t, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """Adams-Bashforth on the eps history; without PRK the second call redoes the first interval with the
        mean of the two eps (a pseudo-Heun start)."""
        prev_t = self._after(t)
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:
            t, prev_t = self._before(t), t
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            if self.cur_sample is None:
                raise InputError("the pseudo-Heun step redoes the run's first step from its sample, which is "
                                 "missing; call `set_timesteps` to start a new run")
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        else:
            model_output = plms_eps(self.ets)
        return self._transfer(sample, t, prev_t, model_output)

    def _transfer(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        """Eq. 9 from ``t`` to ``prev_t``; v-prediction becomes eps against ``sample`` here, after the PRK / PLMS
        combination, which is where Diffusers converts it."""
        alpha_t, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        if self.config.prediction_type == "v_prediction":
            model_output = np.sqrt(alpha_t) * model_output + np.sqrt(np.float32(1) - alpha_t) * sample
        return pndm_transfer(sample, model_output, alpha_t, alpha_prev)
