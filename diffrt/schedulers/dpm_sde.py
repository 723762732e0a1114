"""DPM-Solver++(2S) SDE, k-diffusion's ``sample_dpmpp_sde`` (A1111's "DPM++ SDE", with Karras sigmas "DPM++ SDE
Karras"; Lu et al. 2022, arXiv:2211.01095, the SDE form of Algorithm 1) as Diffusers' ``DPMSolverSDEScheduler``.

Each sigma interval takes two model calls, each followed by an ancestral step in t = -log sigma: the first to the
log-midpoint sigma_mid = sqrt(sigma * sigma_next), the second over the whole interval from the same start, using
the x0 predicted at the midpoint. Both steps add noise from *one* Brownian path over sigma (``brownian.py``), so the
noise of the second step contains that of the first, as the SDE solver requires.

Why the noise is not bit-identical to Diffusers'. Diffusers draws it from ``torchsde.BrownianInterval``: an
interval tree that, for every query, bisects down to a 1e-6 tolerance and draws each new node from a fresh
``torch.Generator`` seeded through NumPy's ``SeedSequence(entropy, spawn_key=(node, depth))``, and Diffusers seeds
it from ``noise_sampler_seed`` or, when that is None, from torch's *global* generator. Matching those bits would
mean porting torchsde's tree (its splitting rules and seed derivation) and about 24 full-latent normal draws per
query; and with the default config the stream is not even reproducible in Diffusers. So we sample the same
stochastic process exactly in distribution, from an explicit generator, and test it statistically (moments of
final samples over many seeds against Diffusers + torchsde and against the analytic Brownian covariances); the
deterministic part (schedule, both stages, the Euler step to sigma 0, the noise scaling) is tested for exact
parity by injecting the same noise sampler on both sides, which Diffusers allows through ``noise_sampler``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import invalid
from .base import (
    KARRAS_COMPATIBLES,
    SchedulerOutput,
    check_set_timesteps,
    freeze,
    register_config,
    sigma_schedule,
    sigma_space_x0,
    sigma_to_t,
    spaced_timesteps,
)
from .brownian import BrownianTreeNoiseSampler
from .sigma_base import SigmaScheduler, ancestral_step, euler_update

SDE_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
NoiseSampler = Callable[[Any, Any], Any]  # (sigma, sigma_next) -> standard normal noise, array-like


def log_midpoints(sigmas: np.ndarray) -> np.ndarray:
    """exp(-(t_i + (t_{i+1} - t_i) / 2)) with t = -log sigma: the midpoint in log sigma of each interval, in the
    float64 arithmetic Diffusers uses for the midpoint timesteps."""
    t = -np.log(sigmas)
    return np.exp(-(t[:-1] + np.diff(t) * 0.5))


class DPMSolverSDEScheduler(SigmaScheduler):
    """Two calls per sigma interval (``order = 2``); the last interval, to sigma 0, is one Euler call.

    Noise comes from a Brownian path seeded by ``noise_sampler_seed`` when the config sets it, else by the
    ``generator`` given to the first ``step`` of a run (our extension: Diffusers' ``step`` takes none and falls
    back on torch's global generator), else by fresh OS entropy. Assigning ``scheduler.noise_sampler`` (a callable
    ``(sigma, sigma_next) -> standard normal array``) after ``set_timesteps`` replaces it, as in Diffusers.
    Beyond Diffusers: custom ``timesteps=`` / ``sigmas=`` (n + 1 values, the last the final sigma; a final sigma
    above 0 makes the last interval a two-call step too) and ``prediction_type="sample"``."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        noise_sampler_seed: int | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._init_tables(prediction_types=SDE_PREDICTION_TYPES)
        self.set_timesteps(num_train_timesteps)  # Diffusers starts from the full training schedule

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.sample: np.ndarray | None = None  # the interval's start, kept for the second call
        self.mid_point_sigma: np.float32 | None = None
        self.noise_sampler: NoiseSampler | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is the first call of an interval."""
        return self.sample is None

    # ---- schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        num_train_timesteps: int | None = None,
        timesteps: Any = None,
        sigmas: Any = None,
    ) -> None:
        """Schedule from a step count, custom timesteps or custom sigmas, with each interval's midpoint timestep
        interleaved after its start: t_0, t_mid_0, t_1, t_mid_1, ..., t_{n-1}. ``num_train_timesteps`` is
        Diffusers' positional argument, accepted when it equals the config's; ``device`` is ignored."""
        cfg = self.config
        if num_train_timesteps is not None and num_train_timesteps != cfg.num_train_timesteps:
            raise invalid("num_train_timesteps", f"None or the config's {cfg.num_train_timesteps}",
                          num_train_timesteps)
        steps, custom_t, custom_s = check_set_timesteps(num_inference_steps, timesteps, sigmas,
                                                        cfg.num_train_timesteps)
        if custom_t is not None:
            self._check_custom_timesteps_allowed(custom_t)
        if custom_s is not None:
            times, step_sigmas, final = sigma_to_t(custom_s[:-1], self.log_sigmas), custom_s[:-1], custom_s[-1]
        else:
            times, step_sigmas = self._sde_schedule(steps, custom_t)
            final = 0.0
        full = np.append(step_sigmas, final)
        midpoints = log_midpoints(full if final > 0 else step_sigmas)
        schedule = np.empty(len(times) + len(midpoints), np.float64)
        schedule[0::2], schedule[1::2] = times, sigma_to_t(midpoints, self.log_sigmas)
        full = full.astype(np.float32)
        self.timesteps = freeze(schedule)
        self.sigmas = freeze(np.concatenate([full[:1], np.repeat(full[1:-1], 2), full[-1:]]))
        self.num_inference_steps = len(step_sigmas)
        self._reset_run_state()

    def _sde_schedule(self, num_steps: int, custom: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) in float64, Diffusers' order: spacing (or custom timesteps) -> interpolated
        sigmas -> optional karras / exponential / beta sigmas over that range, timesteps back by sigma -> t."""
        cfg = self.config
        timesteps = custom if custom is not None else spaced_timesteps(
            cfg.timestep_spacing, cfg.num_train_timesteps, num_steps, cfg.steps_offset).astype(np.float64)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        scheduled = sigma_schedule(cfg, sigmas, num_steps)
        if scheduled is not sigmas:
            return sigma_to_t(scheduled, self.log_sigmas), scheduled
        return timesteps, sigmas

    # ---- per-step
    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray:
        """Divide by sqrt(sigma^2 + 1), with the midpoint sigma on an interval's second call."""
        i = self._current_step_index(timestep)
        # the midpoint sigma is set, with `sample`, by an interval's first call
        sigma = self.sigmas[i] if self.mid_point_sigma is None else self.mid_point_sigma
        self.is_scale_input_called = True
        return sample / np.sqrt(sigma * sigma + np.float32(1))

    def _make_noise_sampler(self, shape: tuple[int, ...], generator: Any) -> BrownianTreeNoiseSampler:
        """A Brownian path over the schedule's positive sigma range (Diffusers' range)."""
        seed = self.config.noise_sampler_seed
        if seed is not None:
            from ..rng import Generator  # here, not at import time: only stochastic runs need it

            generator = Generator("cpu").manual_seed(seed)
        positive = self.sigmas[self.sigmas > 0]
        return BrownianTreeNoiseSampler(shape, float(positive.min()), float(self.sigmas.max()), generator)

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        return_dict: bool = True,
        s_noise: float = 1.0,
        generator: Any = None,
    ) -> SchedulerOutput | tuple:
        """First call of an interval: ancestral step sigma -> sigma_mid. Second call: ancestral step over the whole
        interval from the kept start with the midpoint's x0. To sigma 0: one Euler step. ``s_noise`` scales the
        injected noise (0 makes the sampler deterministic)."""
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        if self.noise_sampler is None:
            self.noise_sampler = self._make_noise_sampler(sample.shape, generator)
        kept = self.sample  # the interval's start, kept by the first call; None before it
        first = kept is None
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        with np.errstate(divide="ignore"):  # sigma_next = 0 gives t_next = inf, unused on that branch
            t, t_next = -np.log(sigma), -np.log(sigma_next)
        t_mid = t + (t_next - t) * np.float32(0.5)
        sigma_input = sigma if first else np.exp(-t_mid)
        x0 = sigma_space_x0(model_output, sample, sigma_input, self.config.prediction_type)
        if sigma_next == 0:
            prev_sample = euler_update(sample, x0, sigma, sigma_next)
        else:
            start = sample if kept is None else kept
            prev_sample = self._ancestral_update(self.noise_sampler, start, x0, t, t_mid if first else t_next,
                                                 s_noise)
            self.sample, self.mid_point_sigma = (start, np.exp(-t_mid)) if first else (None, None)
        prev_sample = prev_sample.astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    @staticmethod
    def _ancestral_update(noise_sampler: NoiseSampler, sample: np.ndarray, x0: np.ndarray, t: np.float32,
                          t_next: np.float32, s_noise: float) -> np.ndarray:
        """k-diffusion's ancestral step in t = -log sigma (``ancestral_step`` with eta = 1): the exponential
        integrator down to sigma_down, then sigma_up times the Brownian noise over [sigma_next, sigma]."""
        sigma_from, sigma_to = np.exp(-t), np.exp(-t_next)
        sigma_down, sigma_up = ancestral_step(sigma_from, sigma_to)
        t_down = -np.log(sigma_down)
        prev_sample = (np.exp(-t_down) / np.exp(-t)) * sample - np.expm1(t - t_down) * x0
        noise = np.asarray(noise_sampler(sigma_from, sigma_to), dtype=np.float32)
        return prev_sample + noise * np.float32(s_noise) * sigma_up
