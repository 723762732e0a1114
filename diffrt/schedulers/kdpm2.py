"""DPM-Solver-2 in sigma space (Karras et al. 2022, appendix; k-diffusion's ``sample_dpm_2`` and
``sample_dpm_2_ancestral``) as Diffusers' ``KDPM2DiscreteScheduler`` / ``KDPM2AncestralDiscreteScheduler``.

Each sigma interval takes two model calls: an Euler step to the midpoint sigma_mid = sqrt(sigma * sigma_target)
(the mean in log sigma), then the step from sigma over the whole interval with the slope taken at the midpoint.
The schedule interleaves the two: timesteps t_0, t_mid_0, t_1, t_mid_1, ..., with every sigma after the first
repeated, so step ``i`` reads its table entries by position as Diffusers does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import invalid
from .base import (
    KARRAS_COMPATIBLES,
    SchedulerOutput,
    draw_noise,
    freeze,
    register_config,
    sigma_space_x0,
    sigma_to_t,
)
from .sigma_base import SigmaScheduler, ancestral_step

KDPM2_PREDICTION_TYPES = ("epsilon", "v_prediction")  # Diffusers has no x0 form for these two


def log_midpoint(sigmas: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """exp(lerp(log sigma, log target, 0.5)) in float32, as ``torch.lerp`` computes it for weight 0.5
    (end - (end - start) * 0.5). A zero sigma gives 0, and 0 with 0 gives NaN, as in Diffusers."""
    with np.errstate(divide="ignore", invalid="ignore"):
        start, end = np.log(sigmas), np.log(targets)
        return np.exp(end - (end - start) * np.float32(0.5))


def repeat_interior(values: np.ndarray) -> np.ndarray:
    """[v0, v1, v1, v2, v2, ..., vn, vn, vn]: Diffusers' per-step table layout for two calls per interval."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2), values[-1:]])


def interleave(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.stack([first, second], axis=-1).ravel()


class _KDPM2Base(SigmaScheduler):
    """Schedule construction and run state shared by both variants; subclasses give the midpoint tables."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2
    sigmas_interpol: np.ndarray

    def _init_kdpm2(self) -> None:
        self._init_tables(prediction_types=KDPM2_PREDICTION_TYPES)
        self.set_timesteps(self.config.num_train_timesteps)  # Diffusers starts from the full training schedule

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        num_train_timesteps: int | None = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """As ``StandardSigmaScheduler.set_timesteps``; ``num_train_timesteps`` is Diffusers' positional argument,
        accepted when it equals the config's (Diffusers only passes it from its constructor)."""
        if num_train_timesteps is not None and num_train_timesteps != self.config.num_train_timesteps:
            raise invalid("num_train_timesteps", f"None or the config's {self.config.num_train_timesteps}",
                          num_train_timesteps)
        self._set_sigma_schedule(num_inference_steps, timesteps, sigmas)

    def _sigma_schedule(self, num_steps: int, custom: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        timesteps, sigmas = super()._sigma_schedule(num_steps, custom)
        if self.config.use_karras_sigmas:  # Diffusers rounds Karras timesteps here (Euler does not)
            timesteps = timesteps.round()
        return timesteps, sigmas

    def _midpoint_timesteps(self, midpoints: np.ndarray) -> np.ndarray:
        """Timesteps of the midpoints, in the float32 arithmetic Diffusers applies to them (its NaN / 0 entries
        map to values it drops)."""
        with np.errstate(invalid="ignore"):
            return sigma_to_t(midpoints, self.log_sigmas, float32_indices=True)

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.sample: np.ndarray | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is the Euler step to the midpoint."""
        return self.sample is None

    def _scale(self, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        self.is_scale_input_called = True
        return sample / np.sqrt(sigma * sigma + np.float32(1))

    def _output(self, step_index: int, prev_sample: np.ndarray, x0: np.ndarray, dtype: Any,
                return_dict: bool) -> SchedulerOutput | tuple:
        prev_sample = prev_sample.astype(dtype, copy=False)
        self._step_index = step_index + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


class KDPM2DiscreteScheduler(_KDPM2Base):
    """DPM-Solver-2 (deterministic). Beyond Diffusers: custom ``timesteps=`` / ``sigmas=``."""

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._init_kdpm2()

    def _install_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Midpoint i lies between sigma_{i-1} and sigma_i (entry 0 pairs sigma_0 with the final 0: NaN, unused)."""
        midpoints = log_midpoint(sigmas, np.roll(sigmas, 1))
        self.sigmas = freeze(repeat_interior(sigmas))
        self.sigmas_interpol = freeze(repeat_interior(midpoints))
        mid_timesteps = self._midpoint_timesteps(midpoints).astype(timesteps.dtype)
        self.timesteps = freeze(np.concatenate([timesteps[:1], interleave(mid_timesteps[1:-1], timesteps[1:])]))

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1), sigma being the midpoint on a second-order call."""
        i = self._current_step_index(timestep)
        table = self.sigmas if self.state_in_first_order else self.sigmas_interpol
        return self._scale(sample, table[i])

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First call: Euler from sigma to the midpoint, remembering the sample. Second call: the slope at the
        midpoint carries the remembered sample from sigma to sigma_next."""
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        kept = self.sample  # the interval's start, kept by the first call; None before it
        if kept is None:
            sigma, midpoint = self.sigmas[i], self.sigmas_interpol[i + 1]
        else:
            sigma, midpoint, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
        x0 = sigma_space_x0(model_output, sample, sigma if kept is None else midpoint, self.config.prediction_type)
        if kept is None:
            derivative, dt = (sample - x0) / sigma, midpoint - sigma
            self.sample = sample
        else:
            derivative, dt = (sample - x0) / midpoint, sigma_next - sigma
            sample, self.sample = kept, None
        return self._output(i, sample + derivative * dt, x0, model_output.dtype, return_dict)


class KDPM2AncestralDiscreteScheduler(_KDPM2Base):
    """DPM-Solver-2 ancestral: the pair of calls integrates down to sigma_down, then fresh noise of std sigma_up
    restores the marginal at sigma_next (k-diffusion ``get_ancestral_step``, eta = 1). The noise comes from
    ``generator`` through ``diffrt.rng``, so a seed gives Diffusers' numbers. Beyond Diffusers: custom
    ``timesteps=`` / ``sigmas=``."""

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._init_kdpm2()

    def _install_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Midpoint i lies between sigma_i and its sigma_down; the last two are 0 (Euler to 0 at the end)."""
        sigmas_next = np.append(sigmas[1:], np.float32(0))
        with np.errstate(divide="ignore", invalid="ignore"):  # the last entry is 0 / 0, as in Diffusers
            sigmas_down, sigmas_up = ancestral_step(sigmas, sigmas_next)
        sigmas_down[-1] = 0.0
        midpoints = log_midpoint(sigmas, sigmas_down)
        midpoints[-2:] = 0.0
        self.sigmas = freeze(repeat_interior(sigmas))
        self.sigmas_interpol = freeze(repeat_interior(midpoints))
        self.sigmas_up = freeze(repeat_interior(sigmas_up))
        self.sigmas_down = freeze(repeat_interior(sigmas_down))
        mid_timesteps = self._midpoint_timesteps(midpoints).astype(timesteps.dtype)
        self.timesteps = freeze(np.concatenate([timesteps[:1], interleave(mid_timesteps[:-2], timesteps[1:])]))

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.dt: np.float32 | None = None

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1), sigma being the midpoint on a second-order call."""
        i = self._current_step_index(timestep)
        return self._scale(sample, self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1])

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint. Second call: from the remembered sample to sigma_down with the
        midpoint slope, plus sigma_up * noise (drawn on second calls only, as in Diffusers)."""
        sample, step_index = self._begin_sigma_step(model_output, timestep, sample)
        kept = self.sample  # the interval's start, kept by the first call; None before it
        i = step_index if kept is None else step_index - 1
        sigma, midpoint = self.sigmas[i], self.sigmas_interpol[i]
        x0 = sigma_space_x0(model_output, sample, sigma if kept is None else midpoint, self.config.prediction_type)
        if kept is None:
            derivative = (sample - x0) / sigma
            self.sample, self.dt = sample, midpoint - sigma
            return self._output(step_index, sample + derivative * self.dt, x0, model_output.dtype, return_dict)
        derivative = (sample - x0) / midpoint
        prev_sample = kept + derivative * (self.sigmas_down[i] - sigma)
        self.sample = None
        noise = draw_noise(model_output.shape, generator, model_output.dtype)
        prev_sample += noise * self.sigmas_up[i]
        return self._output(step_index, prev_sample, x0, model_output.dtype, return_dict)
