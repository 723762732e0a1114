"""DPM-Solver and DPM-Solver++ multistep samplers (Lu et al. 2022, arXiv:2206.00927 and arXiv:2211.01095), with
Diffusers' ``DPMSolverMultistepScheduler`` API and config.

The update math is a handful of free functions over noise levels on the VP path x = alpha x0 + sigma eps, so the
singlestep, SDE and inverse variants can import them: ``noise_level`` (sigma -> alpha, sigma, lambda),
``data_prediction`` / ``noise_prediction`` (model output -> x0 or eps), ``multistep_derivatives`` (backward
differences D1, D2 from past outputs) and ``exponential_integrator_step`` (one step of the chosen algorithm).
Scalar coefficients are float32 and every expression keeps Diffusers' operation order, so float32 rounding matches.

The scheduler classes share by inheritance rather than by copying methods: ``DPMSolverBase`` (per-step machinery of
every DPM-Solver scheduler), ``DPMSolverMultistepBase`` (the multistep update, also the inversion's and EDM
DPM-Solver's) and ``ForwardScheduleMixin`` (schedule pieces of the denoising solvers, also the singlestep one's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, InputError, invalid
from .base import (
    KARRAS_COMPATIBLES,
    TIMESTEP_SPACINGS,
    FrozenConfig,
    SchedulerBase,
    SchedulerOutput,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    draw_noise,
    dynamic_threshold,
    freeze,
    karras_sigmas,
    register_config,
    sigma_schedule,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")
DPM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
# Diffusers loads DEIS / UniPC configs into this class by mapping their solver names onto its own.
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


# ------------------------------------------------------------------------------------------------ noise levels
@dataclass(frozen=True)
class NoiseLevel:
    """A point of the VP path x = alpha * x0 + sigma * eps; ``lam`` = log(alpha / sigma), the half log-SNR."""

    alpha: np.float32
    sigma: np.float32
    lam: np.float32


def alpha_sigma(sigma: Any, flow: bool = False) -> tuple[Any, Any]:
    """(alpha_t, sigma_t) for a Karras sigma (sigma = sigma_t / alpha_t): alpha_t = 1 / sqrt(sigma^2 + 1); or,
    for rectified flow, x = (1 - sigma) x0 + sigma eps. Works on float32 scalars and arrays alike."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / np.sqrt(sigma * sigma + 1)
    return alpha_t, sigma * alpha_t


def noise_level(sigma: Any, flow: bool = False) -> NoiseLevel:
    """The noise level of a schedule sigma, in float32. sigma = 0 gives lambda = +inf, which the update
    formulas turn into exact limits (exp(-inf) = 0)."""
    alpha_t, sigma_t = alpha_sigma(np.float32(sigma), flow)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha_t) - np.log(sigma_t)
    return NoiseLevel(alpha_t, sigma_t, lam)


# -------------------------------------------------------------------------------------------- parameterisation
def data_prediction(model_output: np.ndarray, sample: np.ndarray, level: NoiseLevel,
                    prediction_type: str) -> np.ndarray:
    """x0 from a model output: what DPM-Solver++ integrates."""
    if prediction_type == "epsilon":
        return (sample - level.sigma * model_output) / level.alpha
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return level.alpha * sample - level.sigma * model_output
    if prediction_type == "flow_prediction":
        return sample - level.sigma * model_output
    raise invalid("prediction_type", "one of " + ", ".join(map(repr, DPM_PREDICTION_TYPES)), prediction_type,
                  ConfigError)


def noise_prediction(model_output: np.ndarray, sample: np.ndarray, level: NoiseLevel,
                     prediction_type: str) -> np.ndarray:
    """eps from a model output: what DPM-Solver (the noise-prediction form) integrates."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - level.alpha * model_output) / level.sigma
    if prediction_type == "v_prediction":
        return level.alpha * model_output + level.sigma * sample
    raise invalid("prediction_type", "one of 'epsilon', 'v_prediction', 'sample' for the noise-prediction solvers",
                  prediction_type, ConfigError)


# ------------------------------------------------------------------------------------------------- update rules
def multistep_derivatives(outputs: Sequence[np.ndarray], t: NoiseLevel,
                          levels: Sequence[NoiseLevel]) -> list[np.ndarray]:
    """[D0, D1, D2][:k] for k = len(outputs) past converted outputs (newest first) at ``levels`` (newest first):
    D0 = m0 and the backward differences in lambda scaled to the step h = lambda_t - lambda_s0
    (Lu et al. 2022b, Algorithm 2 and its third-order extension)."""
    m0 = outputs[0]
    if len(outputs) == 1:
        return [m0]
    h = t.lam - levels[0].lam
    r0 = (levels[0].lam - levels[1].lam) / h
    d1_0 = (1.0 / r0) * (m0 - outputs[1])
    if len(outputs) == 2:
        return [m0, d1_0]
    r1 = (levels[1].lam - levels[2].lam) / h
    d1_1 = (1.0 / r1) * (outputs[1] - outputs[2])
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return [m0, d1, d2]


def recent_outputs(history: Sequence[np.ndarray | None], count: int) -> list[np.ndarray]:
    """The last ``count`` entries of a solver's output history (None-padded at the start of a run), oldest
    first. The solvers' order logic never asks for more outputs than the run has made."""
    outputs = [m for m in history[-count:] if m is not None]
    if len(outputs) != count:
        raise InputError(f"this step needs {count} past model outputs and the run has {len(outputs)}; call "
                         "`set_timesteps` to start a new run")
    return outputs


def step_coefficients(
    algorithm_type: str, t: NoiseLevel, s: NoiseLevel, order: int, d1_rule: str = "midpoint"
) -> tuple[np.float32, list[np.float32], np.float32 | None]:
    """(c_sample, [c_D0, c_D1, c_D2][:order], c_noise) so that x_t = c_sample x_s + sum c_Dk Dk + c_noise z.
    ``d1_rule`` picks D1's weight: "midpoint" (half of D0's) or "heun" (the phi_2 Taylor weight). Only the
    weights the order needs are computed: at sigma_t = 0 (h = inf) the higher ones are undefined."""
    h = t.lam - s.lam
    if algorithm_type == "dpmsolver++":
        return _data_coefficients(t, s, h, order, d1_rule)
    if algorithm_type == "dpmsolver":
        return _noise_coefficients(t, s, h, order, d1_rule)
    if algorithm_type == "sde-dpmsolver++":
        return _sde_data_coefficients(t, s, h, order, d1_rule)
    if algorithm_type == "sde-dpmsolver":
        return _sde_noise_coefficients(t, s, h, order, d1_rule)
    raise invalid("algorithm_type", "one of " + ", ".join(map(repr, ALGORITHM_TYPES)), algorithm_type, ConfigError)


def _data_coefficients(t: NoiseLevel, s: NoiseLevel, h: np.float32, order: int, d1_rule: str) -> tuple:
    """DPM-Solver++: exponential integrator on x0 (Lu et al. 2022b, eqs. 9-10 and the third-order extension)."""
    phi = np.exp(-h) - 1.0
    weights = [-(t.alpha * phi)]
    if order >= 2:
        weights.append(-(0.5 * (t.alpha * phi)) if d1_rule == "midpoint" else t.alpha * (phi / h + 1.0))
    if order >= 3:
        weights.append(-(t.alpha * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)))
    return t.sigma / s.sigma, weights, None


def _noise_coefficients(t: NoiseLevel, s: NoiseLevel, h: np.float32, order: int, d1_rule: str) -> tuple:
    """DPM-Solver: exponential integrator on eps (Lu et al. 2022a, eqs. 3.4-3.6 in multistep form)."""
    phi = np.exp(h) - 1.0
    weights = [-(t.sigma * phi)]
    if order >= 2:
        weights.append(-(0.5 * (t.sigma * phi)) if d1_rule == "midpoint" else -(t.sigma * (phi / h - 1.0)))
    if order >= 3:
        weights.append(-(t.sigma * ((np.exp(h) - 1.0 - h) / h**2 - 0.5)))
    return t.alpha / s.alpha, weights, None


def _sde_data_coefficients(t: NoiseLevel, s: NoiseLevel, h: np.float32, order: int, d1_rule: str) -> tuple:
    """SDE-DPM-Solver++ (Lu et al. 2022b, appendix): the x0 integrator of the reverse SDE, which decays the
    sample by exp(-h) more and injects sigma_t sqrt(1 - exp(-2h)) fresh noise."""
    decay = 1.0 - np.exp(-2.0 * h)
    weights = [t.alpha * decay]
    if order >= 2:
        weights.append(0.5 * (t.alpha * decay) if d1_rule == "midpoint" else t.alpha * (decay / (-2.0 * h) + 1.0))
    if order >= 3:
        weights.append(t.alpha * ((decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
    return t.sigma / s.sigma * np.exp(-h), weights, t.sigma * np.sqrt(1.0 - np.exp(-2 * h))


def _sde_noise_coefficients(t: NoiseLevel, s: NoiseLevel, h: np.float32, order: int, d1_rule: str) -> tuple:
    """SDE-DPM-Solver on eps; defined up to second order only (Diffusers has no third-order form)."""
    if order > 2:
        raise invalid("solver_order", "1 or 2 for algorithm_type 'sde-dpmsolver'", order, ConfigError)
    phi = np.exp(h) - 1.0
    weights = [-(2.0 * (t.sigma * phi))]
    if order >= 2:
        weights.append(-(t.sigma * phi) if d1_rule == "midpoint" else -(2.0 * (t.sigma * (phi / h - 1.0))))
    return t.alpha / s.alpha, weights, t.sigma * np.sqrt(np.exp(2 * h) - 1.0)


def exponential_integrator_step(
    sample: np.ndarray,
    derivatives: Sequence[np.ndarray],
    t: NoiseLevel,
    s: NoiseLevel,
    algorithm_type: str,
    d1_rule: str = "midpoint",
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """One DPM-Solver step from level ``s`` to ``t`` with derivative estimates [D0, D1, D2][:order], summed left to
    right (Diffusers' order) in float32. The SDE variants need ``noise`` shaped like ``sample``."""
    c_sample, coefficients, c_noise = step_coefficients(algorithm_type, t, s, len(derivatives), d1_rule)
    out = sample * c_sample
    for coefficient, derivative in zip(coefficients, derivatives):
        out += coefficient * derivative
    if c_noise is not None:
        if noise is None:
            raise invalid("noise", f"an array for algorithm_type {algorithm_type!r}", None)
        out += c_noise * noise
    return out


def dpm_spaced_timesteps(spacing: str, num_train_timesteps: int, last_timestep: int, num_steps: int,
                         steps_offset: int = 0) -> np.ndarray:
    """DPM-Solver's integer timesteps: n + 1 points below ``last_timestep`` (the lambda clip) with the lowest
    dropped, so the final step lands on the final sigma instead. ``trailing`` keeps the training-length ratio."""
    if spacing == "trailing":
        return np.arange(last_timestep, 0, -num_train_timesteps / num_steps).round() - 1
    spaced = spaced_timesteps(spacing, last_timestep, num_steps + 1, steps_offset)
    return (spaced.round() if spacing == "linspace" else spaced)[:-1]


def flow_sigmas(num_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """Rectified-flow sigmas in (0, 1], shifted by sigma' = s sigma / (1 + (s - 1) sigma) (Esser et al. 2024, SD3)."""
    sigmas = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_steps + 1)
    return np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()


# ------------------------------------------------------------------------------------------- shared scheduler parts
class DPMSolverBase(SchedulerBase):
    """What the DPM-Solver schedulers (multistep, singlestep, inverse) share per step: solver-name aliases, the
    lambda clip, noise levels, model-output conversion, SDE noise, input scaling and ``add_noise``. It reads only
    config keys all three have; each subclass builds its own tables and schedule."""

    alphas_cumprod: np.ndarray
    sigmas: np.ndarray

    def _apply_aliases(self, algorithm_type: str, solver_type: str) -> None:
        """DEIS / UniPC configs name their own solvers; Diffusers maps them onto DPM-Solver's and records that."""
        changes = {}
        if algorithm_type in _ALGORITHM_ALIASES:
            changes["algorithm_type"] = _ALGORITHM_ALIASES[algorithm_type]
        if solver_type in _SOLVER_ALIASES:
            changes["solver_type"] = _SOLVER_ALIASES[solver_type]
        if changes:
            self._update_config(**changes)

    def _last_timestep(self) -> int:
        """One past the last timestep whose lambda is >= ``lambda_min_clipped`` (critical for the cosine schedule,
        whose lambda dives to -inf at the end)."""
        if self.config.lambda_min_clipped == -float("inf"):
            return self.config.num_train_timesteps
        alpha_t, sigma_t = np.sqrt(self.alphas_cumprod), np.sqrt(np.float32(1) - self.alphas_cumprod)
        lambdas = np.log(alpha_t) - np.log(sigma_t)
        return self.config.num_train_timesteps - int(np.searchsorted(lambdas[::-1], self.config.lambda_min_clipped))

    def scale_model_input(self, sample: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        """Identity: DPM-Solver feeds the model the sample as is."""
        return sample

    def _level(self, index: int) -> NoiseLevel:
        return noise_level(self.sigmas[index], bool(self.config.use_flow_sigmas))

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as the solver integrates it at the current step: x0 for the ``++`` algorithms, eps
        otherwise, after dynamic thresholding of x0 when configured (Saharia et al. 2022)."""
        cfg = self.config
        if cfg.variance_type is not None:  # learned variance rides in the second half of the channels
            model_output = model_output[:, : sample.shape[1]]
        level = self._level(self._active_step_index())
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = data_prediction(model_output, sample, level, cfg.prediction_type)
            if cfg.thresholding:
                x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0
        eps = noise_prediction(model_output, sample, level, cfg.prediction_type)
        if cfg.thresholding:
            x0 = dynamic_threshold((sample - level.sigma * eps) / level.alpha, cfg.dynamic_thresholding_ratio,
                                   cfg.sample_max_value)
            eps = (sample - level.alpha * x0) / level.sigma
        return eps

    def _noise(self, shape: tuple[int, ...], generator: Any, variance_noise: np.ndarray | None) -> np.ndarray | None:
        if not self.config.algorithm_type.startswith("sde-"):
            return None
        if variance_noise is not None:
            if tuple(variance_noise.shape) != tuple(shape):
                raise invalid("variance_noise", f"an array of shape {tuple(shape)}", tuple(variance_noise.shape))
            return variance_noise.astype(np.float32, copy=False)
        return draw_noise(shape, generator, np.float32)

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


class DPMSolverMultistepBase(DPMSolverBase):
    """The multistep update over whatever schedule the subclass builds: DPM-Solver steps down a descending one,
    its inversion up an ascending one, with the same step, order logic and run state."""

    timesteps: np.ndarray

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.model_outputs: list[np.ndarray | None] = [None] * self.config.solver_order
        self.lower_order_nums = 0

    def _step_order(self, i: int) -> int:
        """The order of this step: lower at the start (not enough history) and, for stability, at the end:
        the last step is first order when stepping to sigma 0, with ``euler_at_final``, or with
        ``lower_order_final`` under 15 steps, which also caps the second-to-last step at second order.
        A zero-length step (karras / exponential / beta / lu sigmas end at sigma_min, and so does the final
        sigma with ``final_sigmas_type="sigma_min"``) is first order too, giving its exact result, x unchanged;
        Diffusers takes it at second order, where the heun weight (e^h - 1) / h is 0 / 0 and the run ends in NaN."""
        cfg, n = self.config, len(self.timesteps)
        short = cfg.lower_order_final and n < 15
        zero_length = self._level(i + 1).lam == self._level(i).lam  # float32 lambdas can tie on 1-ulp sigmas
        last = i == n - 1 and (cfg.euler_at_final or short or self.sigmas[-1] == 0)
        second_last = i == n - 2 and short
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or last or zero_length:
            return 1
        if cfg.solver_order == 2 or self.lower_order_nums < 2 or second_last:
            return 2
        return 3

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        variance_noise: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One multistep update from sigma_i to sigma_{i+1} in float32 (Diffusers upcasts too); the result has
        the model output's dtype. The SDE variants draw their noise from ``generator`` on every step, or take
        ``variance_noise``."""
        i = self._start_step(model_output, timestep)
        order = self._step_order(i)
        x = sample.astype(np.float32, copy=False)
        converted = self.convert_model_output(model_output, x)
        self.model_outputs = self.model_outputs[1:] + [converted]
        noise = self._noise(converted.shape, generator, variance_noise)
        levels = [self._level(i - k) for k in range(order)]
        outputs = recent_outputs(self.model_outputs, order)[::-1]
        target = self._level(i + 1)
        derivatives = multistep_derivatives(outputs, target, levels)
        d1_rule = self.config.solver_type if order == 2 else "heun"  # third order always uses the phi_2 weight
        prev_sample = exponential_integrator_step(x, derivatives, target, levels[0], self.config.algorithm_type,
                                                  d1_rule, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        pred_original_sample = converted
        if not self.config.algorithm_type.endswith("++"):
            pred_original_sample = (x - levels[0].sigma * converted) / levels[0].alpha
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class ForwardScheduleMixin:
    """Schedule pieces of the denoising DPM-Solvers (multistep and singlestep): the flow shift, the final sigma and
    custom sigmas. The inversion builds its ascending schedule, which ends differently, itself."""

    config: FrozenConfig
    train_sigmas: np.ndarray
    log_sigmas: np.ndarray

    def _flow_shift(self, mu: float | None) -> float:
        if mu is None:
            return float(self.config.flow_shift)
        if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
            raise invalid("mu", "None unless `use_dynamic_shifting` is True", mu)
        return float(np.exp(mu))

    def _with_final(self, sigmas: np.ndarray) -> np.ndarray:
        """Append the final sigma (0, or the smallest training sigma) and round the schedule to float32."""
        final = float(self.train_sigmas[0]) if self.config.final_sigmas_type == "sigma_min" else 0.0
        return np.concatenate([sigmas, [final]]).astype(np.float32)

    def _custom_sigma_schedule(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Custom sigmas: timesteps by sigma -> t rounded to the nearest training step (flow: sigma * N)."""
        cfg = self.config
        if cfg.algorithm_type in ("dpmsolver", "sde-dpmsolver") and sigmas[-1] <= 0:
            raise invalid("sigmas", f"> 0 at the end for algorithm_type {cfg.algorithm_type!r} (its update is "
                          "undefined at sigma 0)", sigmas.tolist())
        if cfg.use_flow_sigmas:
            if sigmas[0] >= 1:
                raise invalid("sigmas", "below 1 with `use_flow_sigmas` (sigma 1 is pure noise)", sigmas.tolist())
            return sigmas[:-1] * cfg.num_train_timesteps, sigmas.astype(np.float32)
        return sigma_to_t(sigmas[:-1], self.log_sigmas).round(), sigmas.astype(np.float32)


# ---------------------------------------------------------------------------------------------------- the scheduler
class DPMSolverMultistepScheduler(ForwardScheduleMixin, DPMSolverMultistepBase):
    """Multistep DPM-Solver / DPM-Solver++ of order 1-3, ODE or SDE. Each step reuses the converted model outputs
    of the previous ones, so one model call per step buys a higher-order update.

    Beyond Diffusers: custom ``sigmas=`` (n steps -> n + 1 values, the last the final sigma; timesteps by
    rounded sigma -> t); ``variance_type`` drops the second half of the channels whatever their count (Diffusers
    keeps 3); ``add_noise`` before ``set_timesteps`` uses the noise level of each timestep."""

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
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        use_lu_lambdas: bool | None = False,
        use_flow_sigmas: bool | None = False,
        flow_shift: float | None = 1.0,
        final_sigmas_type: str | None = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ) -> None:
        self._apply_aliases(algorithm_type, solver_type)
        self._check_config()
        _, _, alphas_cumprod = alphas_cumprod_from_config(self.config)
        if rescale_betas_zero_snr:  # alpha-bar 0 would make sigma infinite; Diffusers uses 2**-24 (fp16 subnormal)
            alphas_cumprod[-1] = 2.0**-24
        self.alphas_cumprod = freeze(alphas_cumprod)
        self.train_sigmas = freeze(sigmas_from_alphas_cumprod(alphas_cumprod))  # ascending in t
        self.log_sigmas = freeze(np.log(self.train_sigmas))
        self.num_inference_steps: int | None = None
        # before set_timesteps: every training step, descending, each with its own sigma
        self.timesteps = freeze(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64))
        self.sigmas = freeze(self.train_sigmas[::-1].copy())
        self._reset_run_state()

    def _check_config(self) -> None:
        cfg = self.config
        check_choice("algorithm_type", cfg.algorithm_type, ALGORITHM_TYPES)
        check_choice("solver_type", cfg.solver_type, SOLVER_TYPES)
        check_choice("solver_order", cfg.solver_order, (1, 2, 3))
        check_choice("prediction_type", cfg.prediction_type, DPM_PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        check_choice("variance_type", cfg.variance_type, (None, "learned", "learned_range"))
        check_choice("time_shift_type", cfg.time_shift_type, ("exponential",))
        flags = [k for k in SCHEDULE_FLAGS if cfg.get(k)]
        if len(flags) > 1:
            raise invalid(" / ".join(SCHEDULE_FLAGS), "at most one True", flags, ConfigError)
        noise_form = cfg.algorithm_type in ("dpmsolver", "sde-dpmsolver")
        if noise_form and cfg.final_sigmas_type == "zero":  # eps-form update is undefined at sigma = 0
            raise invalid("final_sigmas_type", f"'sigma_min' for algorithm_type {cfg.algorithm_type!r}",
                          cfg.final_sigmas_type, ConfigError)
        if noise_form and cfg.prediction_type == "flow_prediction":
            raise invalid("prediction_type", f"not 'flow_prediction' for algorithm_type {cfg.algorithm_type!r}",
                          cfg.prediction_type, ConfigError)
        if cfg.algorithm_type == "sde-dpmsolver" and cfg.solver_order == 3:  # Diffusers fails mid-run here
            raise invalid("solver_order", "1 or 2 for algorithm_type 'sde-dpmsolver'", 3, ConfigError)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Build the schedule from a step count, custom integer timesteps (as Diffusers) or custom sigmas (ours:
        n + 1 values, the last the final sigma). ``mu`` sets the flow shift to exp(mu) for this schedule when
        ``use_dynamic_shifting``. ``device`` is accepted for API compatibility and ignored."""
        steps, custom_t, custom_s = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                        self.config.num_train_timesteps)
        shift = self._flow_shift(mu)
        if custom_t is not None:
            flag = next((k for k in SCHEDULE_FLAGS if self.config.get(k)), None)
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
        self._reset_run_state()

    def _step_schedule(self, num_steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) for a step count in Diffusers' order: spacing below the lambda clip, then one of
        karras / lu / exponential / beta / flow sigmas (timesteps back through sigma -> t), then the final sigma.
        Karras and Lu timesteps are rounded, the others truncated, as Diffusers does."""
        cfg = self.config
        if cfg.use_flow_sigmas:
            sigmas = flow_sigmas(num_steps, cfg.num_train_timesteps, shift)
            return sigmas * cfg.num_train_timesteps, self._with_final(sigmas)
        descending = self.train_sigmas[::-1]
        if cfg.use_lu_lambdas:  # uniform in log-SNR (Lu et al. 2022a): linear in log sigma between the ends
            log_descending = self.log_sigmas[::-1]
            sigmas = np.exp(karras_sigmas(float(log_descending[-1]), float(log_descending[0]), num_steps, rho=1.0))
        else:
            sigmas = sigma_schedule(cfg, descending, num_steps)
        if sigmas is not descending:
            times = sigma_to_t(sigmas, self.log_sigmas)
            if (cfg.use_karras_sigmas or cfg.use_lu_lambdas) and cfg.beta_schedule != "squaredcos_cap_v2":
                times = times.round()
            return times, self._with_final(sigmas)
        times = dpm_spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, self._last_timestep(),
                                     num_steps, cfg.steps_offset).astype(np.int64)
        return times, self._with_final(np.interp(times, np.arange(len(self.train_sigmas)), self.train_sigmas))
