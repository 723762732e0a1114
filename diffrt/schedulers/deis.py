"""DEIS multistep sampling (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
the log-rho variant of sec. 4) as Diffusers' ``DEISMultistepScheduler``.

DEIS integrates the noise prediction in rho = sigma_t / alpha_t with an exponential integrator: the first-order
step is DPM-Solver-1 (imported from ``dpm_solver``), the higher orders integrate the Lagrange polynomial through
the last two or three eps in log rho, whose integrals have the closed forms of ``_logrho_weight2/3``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, invalid
from .base import (
    BETA_SCHEDULES,
    KARRAS_COMPATIBLES,
    TIMESTEP_SPACINGS,
    SchedulerBase,
    SchedulerOutput,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    dynamic_threshold,
    freeze,
    register_config,
    sigma_schedule,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from .dpm_solver import (
    NoiseLevel,
    alpha_sigma,
    data_prediction,
    dpm_spaced_timesteps,
    exponential_integrator_step,
    flow_sigmas,
    noise_level,
    recent_outputs,
)

DEIS_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
DEIS_SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas")
# Diffusers loads DPM-Solver / UniPC configs into DEIS by mapping their solver names onto its own
_ALGORITHM_ALIASES = {"dpmsolver": "deis", "dpmsolver++": "deis"}
_SOLVER_ALIASES = {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"}


# ------------------------------------------------------------------------------------------ log-rho weights
def _logrho_weight2(t: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """Antiderivative in rho of the linear Lagrange basis in log rho through (b, c), equal to 1 at b."""
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def _logrho_weight3(t: np.float32, b: np.float32, c: np.float32, d: np.float32) -> np.float32:
    """Antiderivative in rho of the quadratic Lagrange basis in log rho through (b, c, d), equal to 1 at b."""
    log_t, log_c, log_d = np.log(t), np.log(c), np.log(d)
    numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t**2 - 2 * log_t + 2)
    return numerator / ((np.log(b) - log_c) * (np.log(b) - log_d))


def deis_multistep_update(sample: np.ndarray, eps: list[np.ndarray], t: NoiseLevel,
                          levels: list[NoiseLevel]) -> np.ndarray:
    """x_t = alpha_t (x_s0 / alpha_s0 + sum_k c_k eps_k) with ``eps`` / ``levels`` newest first (2 or 3 of each):
    c_k integrates basis polynomial k over rho from rho_s0 to rho_t (Zhang & Chen 2023, eq. 15)."""
    rho_t = t.sigma / t.alpha
    rhos = [level.sigma / level.alpha for level in levels]
    weight = _logrho_weight2 if len(eps) == 2 else _logrho_weight3
    out = sample / levels[0].alpha
    for k, e in enumerate(eps):
        others = rhos[k + 1:] + rhos[:k]  # Diffusers' argument order: node k, then the rest cyclically
        coefficient = weight(rho_t, rhos[k], *others) - weight(rhos[0], rhos[k], *others)
        out += coefficient * e
    return t.alpha * out


# ---------------------------------------------------------------------------------------------- the scheduler
class DEISMultistepScheduler(SchedulerBase):
    """Multistep DEIS of order 1-3, one model call per step. Beyond Diffusers: custom ``timesteps=`` and
    ``sigmas=`` (n steps -> n + 1 values, the last the final sigma, above 0: the eps-form update is undefined
    at sigma 0); ``mu`` shifts this schedule only (Diffusers writes exp(mu) into its config for good);
    ``add_noise`` before ``set_timesteps`` uses each timestep's own noise level."""

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
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
        self._reset_run_state()

    def _apply_aliases(self, algorithm_type: str, solver_type: str) -> None:
        changes = {}
        if algorithm_type in _ALGORITHM_ALIASES:
            changes["algorithm_type"] = _ALGORITHM_ALIASES[algorithm_type]
        if solver_type in _SOLVER_ALIASES:
            changes["solver_type"] = _SOLVER_ALIASES[solver_type]
        if changes:
            self._update_config(**changes)

    def _check_config(self) -> None:
        cfg = self.config
        check_choice("algorithm_type", cfg.algorithm_type, ("deis",))
        check_choice("solver_type", cfg.solver_type, ("logrho",))
        check_choice("solver_order", cfg.solver_order, (1, 2, 3))
        check_choice("prediction_type", cfg.prediction_type, DEIS_PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential",))
        flags = [k for k in DEIS_SCHEDULE_FLAGS if cfg.get(k)]
        if len(flags) > 1:
            raise invalid(" / ".join(DEIS_SCHEDULE_FLAGS), "at most one True", flags, ConfigError)

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.model_outputs: list[np.ndarray | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Integer timesteps from a step count (Diffusers' spacing; or Karras / exponential / beta / flow sigmas),
        custom integer timesteps, or custom sigmas. ``mu`` sets the flow shift to exp(mu) for this schedule when
        ``use_dynamic_shifting``. ``device`` is accepted for API compatibility and ignored."""
        steps, custom_t, custom_s = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                        self.config.num_train_timesteps)
        shift = self._flow_shift(mu)
        if custom_t is not None:
            times, full = self._custom_timestep_schedule(custom_t)
        elif custom_s is not None:
            times, full = self._custom_sigma_schedule(custom_s)
        else:
            times, full = self._step_schedule(steps, shift)
        self.timesteps = freeze(np.asarray(times).astype(np.int64))
        self.sigmas = freeze(full)
        self.num_inference_steps = len(self.timesteps)
        self._reset_run_state()

    def _flow_shift(self, mu: float | None) -> float:
        if mu is None:
            return float(self.config.flow_shift)
        if not self.config.use_dynamic_shifting:
            raise invalid("mu", "None unless `use_dynamic_shifting` is True", mu)
        return float(np.exp(mu))

    def _step_schedule(self, num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """Diffusers' order: flow sigmas, or spacing -> optional karras / exponential / beta sigmas (timesteps back
        through sigma -> t, Karras' rounded, the others truncated). The spaced schedule ends at the smallest
        training sigma; the others repeat their last sigma, so their last step is a no-op, as in Diffusers."""
        cfg = self.config
        if cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_steps, cfg.num_train_timesteps, shift)
            return sigmas * cfg.num_train_timesteps, np.append(sigmas, sigmas[-1]).astype(np.float32)
        descending = self.train_sigmas[::-1]
        sigmas = sigma_schedule(cfg, descending, num_steps)
        if sigmas is not descending:
            times = sigma_to_t(sigmas, self.log_sigmas)
            times = times.round() if cfg.use_karras_sigmas else times
            return times, np.append(sigmas, sigmas[-1]).astype(np.float32)
        times = dpm_spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, cfg.num_train_timesteps,
                                     num_steps, cfg.steps_offset).astype(np.int64)
        return times, self._with_training_final(self._interp_sigmas(times))

    def _interp_sigmas(self, times: np.ndarray) -> np.ndarray:
        return np.interp(times, np.arange(len(self.train_sigmas)), self.train_sigmas)

    def _with_training_final(self, sigmas: np.ndarray) -> np.ndarray:
        return np.append(sigmas, self.train_sigmas[0]).astype(np.float32)

    def _custom_timestep_schedule(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flag = next((k for k in DEIS_SCHEDULE_FLAGS if self.config.get(k)), None)
        if flag:
            raise invalid("timesteps", f"None with `{flag}` = True (pass `sigmas` instead)", timesteps.tolist())
        if not np.all(timesteps == np.round(timesteps)):
            raise invalid("timesteps", "integers", timesteps.tolist())
        times = timesteps.astype(np.int64)
        return times, self._with_training_final(self._interp_sigmas(times))

    def _custom_sigma_schedule(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Timesteps by sigma -> t rounded to the nearest training step (flow: sigma * N)."""
        if sigmas[-1] <= 0:
            raise invalid("sigmas", "ending above 0 (DEIS integrates eps, undefined at sigma 0)", sigmas.tolist())
        if self.config.use_flow_sigmas:
            if sigmas[0] >= 1:
                raise invalid("sigmas", "below 1 with `use_flow_sigmas` (sigma 1 is pure noise)", sigmas.tolist())
            return sigmas[:-1] * self.config.num_train_timesteps, sigmas.astype(np.float32)
        return sigma_to_t(sigmas[:-1], self.log_sigmas).round(), sigmas.astype(np.float32)

    # ---- per-step
    def scale_model_input(self, sample: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        """Identity: DEIS feeds the model the sample as is."""
        return sample

    def _level(self, index: int) -> NoiseLevel:
        return noise_level(self.sigmas[index], bool(self.config.use_flow_sigmas))

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """eps at the current step, through x0 (so dynamic thresholding of x0 can apply), as Diffusers does."""
        level = self._level(self._active_step_index())
        x0 = data_prediction(model_output, sample, level, self.config.prediction_type)
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return (sample - level.alpha * x0) / level.sigma

    def _step_order(self, i: int) -> int:
        """Lower orders at the start (not enough history) and, under 15 steps with ``lower_order_final``, at the
        end: first order for the last step, at most second for the one before."""
        cfg, n = self.config, len(self.timesteps)
        short = cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or (short and i == n - 1):
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or (short and i == n - 2):
            return 2
        return 3

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep update from sigma_i to sigma_{i+1} in float32; the result has the model output's dtype."""
        i = self._start_step(model_output, timestep)
        order = self._step_order(i)
        x = sample.astype(np.float32, copy=False)
        eps = self.convert_model_output(model_output, x)
        self.model_outputs = self.model_outputs[1:] + [eps]
        target, levels = self._level(i + 1), [self._level(i - k) for k in range(order)]
        if order == 1:
            prev_sample = exponential_integrator_step(x, [eps], target, levels[0], "dpmsolver")
        else:
            prev_sample = deis_multistep_update(x, recent_outputs(self.model_outputs, order)[::-1], target, levels)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """alpha_t x0 + sigma_t noise at each timestep's noise level. Before a run each timestep is looked up;
        after ``set_begin_index`` (img2img) or mid-run (inpainting) that index is used, as in Diffusers."""
        timesteps = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t) for t in timesteps]
        else:
            indices = [self._begin_index if self._step_index is None else self._step_index] * len(timesteps)
        sigma = self.sigmas.astype(original_samples.dtype)[indices]
        sigma = sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1))
        alpha_t, sigma_t = alpha_sigma(sigma, bool(self.config.use_flow_sigmas))
        return alpha_t * original_samples + sigma_t * noise
