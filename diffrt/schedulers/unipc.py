"""UniPC multistep sampler (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
of Diffusion Models", arXiv:2302.04867, Algorithms 2 and 3), with Diffusers' ``UniPCMultistepScheduler`` API and
config.

Each step first corrects the current sample with UniC, using the model output just evaluated at it, then predicts
the next one with UniP. Both are exponential integrators in lambda = log(alpha / sigma) on the VP path
x = alpha x0 + sigma eps, sharing DPM-Solver's noise levels and parameterisations (imported from
``dpm_solver``). With ``predict_x0`` they integrate the data prediction x0, otherwise the noise prediction; the
B(h) variants are ``bh1``: B(h) = h and ``bh2``: B(h) = e^h - 1.

The coefficients follow Diffusers' dtype path: float32 from the float32 sigma schedule, the small order-condition
systems solved in float32 (``np.linalg.solve``, as Diffusers' ``torch.linalg.solve``), then cast to the sample dtype.
The noise-prediction form (``predict_x0=False``) subtracts terms ~e^h larger than its result, so across big log-SNR
jumps it magnifies float32 ulps (torch's CPU sqrt is itself not correctly rounded); the data-prediction default is
the well-conditioned one.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DiffrtError, InputError, invalid
from .base import (
    KARRAS_COMPATIBLES,
    TIMESTEP_SPACINGS,
    SchedulerBase,
    SchedulerOutput,
    alphas_cumprod_from_config,
    check_choice,
    check_set_timesteps,
    check_sigma_flags,
    dynamic_threshold,
    freeze,
    register_config,
    sigma_schedule,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from .dpm_solver import NoiseLevel, alpha_sigma, data_prediction, dpm_spaced_timesteps, noise_level, noise_prediction

logger = logging.getLogger(__name__)

SOLVER_TYPES = ("bh1", "bh2")
LEGACY_SOLVER_TYPES = ("midpoint", "heun", "logrho")  # DPM-Solver / DEIS names; Diffusers maps them to bh2
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Diffusers keys this port accepts only at their defaults (flow-matching schedules, an external predictor)
UNSUPPORTED = {"use_flow_sigmas": False, "use_dynamic_shifting": False, "solver_p": None, "shift_terminal": None}


# ------------------------------------------------------------------------------------------------------ UniPC math
def _expm1(x: np.floating) -> np.floating:
    """e^x - 1 rounded from float64 to the dtype of ``x``. Torch's float32 expm1 is correctly rounded where
    NumPy's float32 one is an ulp off for ~8% of inputs; the noise-prediction update subtracts two terms ~e^h
    larger than its result, which turns that ulp into 1e-4 relative differences from Diffusers."""
    return np.expm1(np.float64(x)).astype(x.dtype)


def bh_system(
    h: np.float32, rks: np.ndarray, order: int, predict_x0: bool, solver_type: str
) -> tuple[np.float32, np.float32, np.ndarray, np.ndarray]:
    """(h phi_1(h), B(h), R, b) of UniPC's order conditions R rho = b: rows R_i = r_k^(i-1) and
    b_i = i! h phi_(i+1)(h) / B(h), with phi_(k+1)(h) = (phi_k(h) - 1/k!) / h; in the dtype of ``h``.
    At sigma_t = 0, h = inf: only h phi_1 = -1 is used then (order 1), and bh2's B(h) = -1 is finite."""
    hh = -h if predict_x0 else h
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h_phi_1 = _expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if solver_type == "bh1" else _expm1(hh)
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(rks ** (i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.stack(rows), np.array(b, dtype=rks.dtype)


def _bh_terms(
    x: np.ndarray, outputs: Sequence[np.ndarray], levels: Sequence[NoiseLevel], order: int, predict_x0: bool,
    solver_type: str,
) -> tuple[np.ndarray, np.float32, list[np.ndarray], np.ndarray, np.ndarray]:
    """What predictor and corrector share: the first-order (DDIM) update from levels[1] to levels[0], the scale
    of the higher-order terms, the divided differences D1_k = (m_k - m0) / r_k of the older outputs (m_k was made
    at levels[k + 1]) and the order-condition system."""
    t, s0 = levels[0], levels[1]
    h = t.lam - s0.lam
    m0 = outputs[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        rks = [(levels[k + 1].lam - s0.lam) / h for k in range(1, order)]
    d1s = [(outputs[k] - m0) / rks[k - 1] for k in range(1, order)]
    rks.append(np.ones((), h.dtype))
    h_phi_1, b_h, r_matrix, b = bh_system(h, np.array(rks, dtype=h.dtype), order, predict_x0, solver_type)
    if predict_x0:
        first_order = t.sigma / s0.sigma * x - t.alpha * h_phi_1 * m0
        scale = t.alpha * b_h
    else:
        first_order = t.alpha / s0.alpha * x - t.sigma * h_phi_1 * m0
        scale = t.sigma * b_h
    return first_order, scale, d1s, r_matrix, b


def _weighted_sum(rhos: np.ndarray, terms: Sequence[np.ndarray]) -> np.ndarray:
    total = rhos[0] * terms[0]
    for rho, term in zip(rhos[1:], terms[1:]):
        total = total + rho * term
    return total


def uni_p(
    x: np.ndarray, outputs: Sequence[np.ndarray], levels: Sequence[NoiseLevel], order: int, predict_x0: bool,
    solver_type: str,
) -> np.ndarray:
    """UniP-``order``: the sample at levels[0] from ``x`` at levels[1] and outputs m_0..m_(order-1), newest first.
    Order 1 is the DDIM step itself: Diffusers adds B(h) * 0 there, which is NaN for bh1 at sigma_t = 0
    (B(h) = h = -inf); we return the exact limit instead (the data prediction m0)."""
    first_order, scale, d1s, r_matrix, b = _bh_terms(x, outputs, levels, order, predict_x0, solver_type)
    if order == 1:
        return first_order.astype(x.dtype, copy=False)
    # order 2 has the closed form rho = 1/2 (the paper's UniP-2); higher orders solve the order conditions
    rhos = np.full(1, 0.5, x.dtype) if order == 2 else np.linalg.solve(r_matrix[:-1, :-1], b[:-1]).astype(x.dtype)
    return (first_order - scale * _weighted_sum(rhos, d1s)).astype(x.dtype, copy=False)


def uni_c(
    x: np.ndarray, model_t: np.ndarray, outputs: Sequence[np.ndarray], levels: Sequence[NoiseLevel], order: int,
    predict_x0: bool, solver_type: str,
) -> np.ndarray:
    """UniC-``order``: redo the step from ``x`` at levels[1] to levels[0] with the output ``model_t`` evaluated at
    the predicted sample there; raises the order of accuracy by one at no extra model call."""
    first_order, scale, d1s, r_matrix, b = _bh_terms(x, outputs, levels, order, predict_x0, solver_type)
    rhos = np.full(1, 0.5, x.dtype) if order == 1 else np.linalg.solve(r_matrix, b).astype(x.dtype)
    older = _weighted_sum(rhos[:-1], d1s) if d1s else 0
    return (first_order - scale * (older + rhos[-1] * (model_t - outputs[0]))).astype(x.dtype, copy=False)


def final_step_error(
    predict_x0: bool, final_order: int, final_sigma: float, previous_sigma: float, sigma_key: str
) -> DiffrtError | None:
    """The error for a schedule whose last UniP step gives NaN / Inf or fails (as it does in Diffusers), else
    None. At sigma = 0, lambda = +inf: the noise-prediction update computes 0 * inf and the divided differences
    divide by r_k = 0; equal final sigmas give h = 0, whose order conditions (order > 2) are singular."""
    if final_sigma == 0 and not predict_x0:
        return invalid(sigma_key, "to end above sigma = 0 when predict_x0=False (the update is 0 * inf there); "
                       "use final_sigmas_type='sigma_min'", "zero" if sigma_key == "final_sigmas_type" else 0.0,
                       ConfigError)
    if final_sigma == 0 and final_order > 1:
        return invalid("lower_order_final", "True when the schedule ends at sigma = 0 and solver_order > 1 "
                       "(the last step would divide by r_k = 0)", False, ConfigError)
    if final_sigma == previous_sigma and final_order > 2:
        return invalid("lower_order_final", "True when the last two sigmas are equal and solver_order > 2 "
                       "(the last step's order conditions are singular)", False, ConfigError)
    return None


# --------------------------------------------------------------------------------------------------------- scheduler
class UniPCMultistepScheduler(SchedulerBase):
    """UniPC-p with UniC on Diffusers' discrete schedules. Samples live on the VP path, so the initial noise has
    unit variance and the model input is not scaled. One instance is one run; ``clone()`` for concurrent runs."""

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
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        solver_p: Any = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ) -> None:
        self._check_config()
        if solver_type in LEGACY_SOLVER_TYPES:
            self._update_config(solver_type="bh2")
        self._disabled = frozenset(int(i) for i in disable_corrector)
        self._init_tables()
        # before set_timesteps: every training step, descending, each with its own sigma (Diffusers pairs the
        # descending timesteps with ascending sigmas here, so its add_noise before set_timesteps is off)
        self.timesteps = freeze(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64))
        self.sigmas = freeze(self.train_sigmas[::-1].copy())
        self.num_inference_steps: int | None = None
        self._reset_run_state()

    def _check_config(self) -> None:
        cfg = self.config
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
        check_sigma_flags(cfg)
        for key, default in UNSUPPORTED.items():
            if cfg[key] != default:
                raise invalid(key, f"{default!r} (not supported by diffrt's UniPC)", cfg[key], ConfigError)
        order = cfg.solver_order
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order < 1:
            raise invalid("solver_order", "an int >= 1", order, ConfigError)
        check_choice("solver_type", cfg.solver_type, SOLVER_TYPES + LEGACY_SOLVER_TYPES)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        corrector = cfg.disable_corrector
        if not isinstance(corrector, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in corrector):
            raise invalid("disable_corrector", "a list of step indices (ints)", corrector, ConfigError)
        if cfg.final_sigmas_type == "zero":  # fails at the last step of every run: say so now
            final_order = 1 if cfg.lower_order_final else int(order)
            error = final_step_error(cfg.predict_x0, final_order, 0.0, 1.0, "final_sigmas_type")
            if error is not None:
                raise error

    def _init_tables(self) -> None:
        """Training tables. With zero-terminal-SNR betas the last alpha-bar is 0 and sigma would be infinite, so
        (like Diffusers) it becomes 2**-24, the smallest positive fp16 subnormal."""
        self.betas, self.alphas, alphas_cumprod = alphas_cumprod_from_config(self.config)
        if self.config.rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2.0**-24
        self.alphas_cumprod = freeze(alphas_cumprod)
        self.train_sigmas = freeze(sigmas_from_alphas_cumprod(alphas_cumprod))  # ascending in t
        self.log_sigmas = freeze(np.log(self.train_sigmas))

    @property
    def init_noise_sigma(self) -> float:
        """The VP path starts from unit-variance noise."""
        return 1.0

    def scale_model_input(self, sample: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        """Identity: VP samples are already at unit scale."""
        return sample

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.model_outputs: list[np.ndarray] = []  # converted outputs, newest first
        self.last_sample: np.ndarray | None = None  # the sample the last predictor started from
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order (multistep warm-up)
        self.this_order: int | None = None  # order of the last predictor, reused by the next corrector

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Build the schedule from a step count, custom integer timesteps (sigmas interpolated in the training
        table, as Diffusers' DPM-Solver does) or custom sigmas (n steps -> n + 1 values, the last the final sigma;
        timesteps by sigma->t, rounded). Custom schedules are a diffrt extension: Diffusers' UniPC takes custom
        sigmas for flow models only. ``device`` is accepted for API compatibility and ignored."""
        steps, custom_t, custom_s = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                        self.config.num_train_timesteps)
        if custom_s is not None:
            times, full = sigma_to_t(custom_s[:-1], self.log_sigmas).round(), custom_s.astype(np.float32)
        elif custom_t is not None:
            times, full = self._custom_timestep_schedule(custom_t)
        else:
            times, full = self._spaced_schedule(steps)
        final_order = 1 if self.config.lower_order_final else min(self.config.solver_order, len(times))
        error = final_step_error(self.config.predict_x0, final_order, full[-1], full[-2],
                                 "sigmas" if custom_s is not None else "final_sigmas_type")
        if error is not None:
            raise error
        self.timesteps = freeze(times.astype(np.int64))
        self.sigmas = freeze(full)
        self.num_inference_steps = len(self.timesteps)
        self._reset_run_state()
        if np.count_nonzero(self.timesteps == self.timesteps[0]) > 1:  # e.g. cosine betas with beta sigmas
            logger.warning("timestep %d repeats: the first `step` looks it up as its second occurrence (Diffusers' "
                           "rule for img2img) and skips a sigma; call set_begin_index(0) to start at the first",
                           self.timesteps[0])

    def _custom_timestep_schedule(self, timesteps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flag = next((k for k in SIGMA_FLAGS if self.config[k]), None)
        if flag is not None:
            raise invalid("timesteps", f"None with `{flag}` = True (pass `sigmas` instead)", timesteps.tolist())
        if np.any(timesteps != np.round(timesteps)):
            raise invalid("timesteps", "integers", timesteps.tolist())
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        return timesteps, np.concatenate([sigmas, [self._training_final_sigma()]]).astype(np.float32)

    def _spaced_schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, float32 sigmas with the final one) from ``timestep_spacing`` and the sigma flags."""
        cfg = self.config
        timesteps = dpm_spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, cfg.num_train_timesteps,
                                         num_steps, cfg.steps_offset).astype(np.int64)
        flag = next((k for k in SIGMA_FLAGS if cfg[k]), None)
        if flag is None:
            sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
            return timesteps, np.concatenate([sigmas, [self._training_final_sigma()]]).astype(np.float32)
        sigmas = sigma_schedule(cfg, self.train_sigmas[::-1], num_steps)
        timesteps = sigma_to_t(sigmas, self.log_sigmas)
        if flag == "use_karras_sigmas":  # Diffusers rounds these; exponential / beta ones are truncated
            timesteps = timesteps.round()
        final = sigmas[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0  # the schedule's own minimum here
        return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)

    def _training_final_sigma(self) -> float:
        return float(self.train_sigmas[0]) if self.config.final_sigmas_type == "sigma_min" else 0.0

    def _levels(self, top: int, order: int) -> list[NoiseLevel]:
        """Noise levels of schedule indices top, top - 1, ..., top - order (newest first)."""
        return [noise_level(self.sigmas[j]) for j in range(top, top - order - 1, -1)]

    # ---- stepping
    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """Correct ``sample`` with UniC (unless disabled for the previous step), then predict the next sample
        with UniP. ``pred_original_sample`` is the x0 prediction at this step. ``generator`` is accepted for API
        uniformity; UniPC is deterministic."""
        i = self._start_step(model_output, timestep)
        cfg = self.config
        if i >= len(self.timesteps):
            raise InputError(f"`step` called past the end of the schedule (step index {i} of {len(self.timesteps)});"
                             " call `set_timesteps` again (or set_begin_index(0) if the first timestep repeats)")
        x0, converted = self._convert(model_output, sample, i)
        if i > 0 and (i - 1) not in self._disabled and self.last_sample is not None and self.this_order is not None:
            sample = uni_c(self.last_sample, converted, self.model_outputs, self._levels(i, self.this_order),
                           self.this_order, cfg.predict_x0, cfg.solver_type)
        self.model_outputs = [converted, *self.model_outputs[: cfg.solver_order - 1]]
        order = min(cfg.solver_order, len(self.timesteps) - i) if cfg.lower_order_final else cfg.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: no more outputs than we have
        self.last_sample = sample
        prev_sample = uni_p(sample, self.model_outputs, self._levels(i + 1, self.this_order), self.this_order,
                            cfg.predict_x0, cfg.solver_type)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _convert(self, model_output: np.ndarray, sample: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(x0, what the solver integrates): x0 (thresholded if configured) with ``predict_x0``, else eps."""
        cfg, dtype = self.config, sample.dtype  # float32 coefficients must not promote a float16 run
        level = noise_level(self.sigmas[i])
        x0 = data_prediction(model_output, sample, level, cfg.prediction_type).astype(dtype, copy=False)
        if not cfg.predict_x0:
            return x0, noise_prediction(model_output, sample, level, cfg.prediction_type).astype(dtype, copy=False)
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0, x0

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """alpha_t x0 + sigma_t noise (the VP forward process) at each timestep's schedule index."""
        sigma = self.sigmas.astype(original_samples.dtype)[self._noise_indices(timesteps)]
        alpha_t, sigma_t = alpha_sigma(sigma.reshape((-1,) + (1,) * (original_samples.ndim - 1)))
        return alpha_t * original_samples + sigma_t * noise

    def _noise_indices(self, timesteps: Any) -> list[int]:
        """Diffusers' rule: look each timestep up before a run; after ``set_begin_index`` (img2img) or mid-run
        (inpainting) use that index."""
        timesteps = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * len(timesteps)
