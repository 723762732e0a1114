"""Side-by-side scheduler loops: a Diffusers scheduler (torch) and ours (NumPy) driven by the same stand-in model.

Use from any scheduler test module::

    from scheduler_harness import assert_parity, Case
    CASES = [Case("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, {"num_inference_steps": 10})]
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_euler_matches_diffusers(case):
        assert_parity(case, ours=EulerDiscreteScheduler)

The model is a fixed function of (sample, timestep) evaluated in NumPy float32 for both sides, so any difference
comes from the schedulers. Both loops follow Diffusers' pipeline order: ``set_timesteps``, latents * init_noise_sigma,
then per timestep ``scale_model_input`` -> model -> ``step``.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Model = Callable[[np.ndarray, float], np.ndarray]
SHAPE = (1, 4, 8, 8)


def tanh_model(sample: np.ndarray, t: float) -> np.ndarray:
    """A smooth deterministic stand-in for a denoiser: bounded, depends on both the input and the timestep."""
    return np.tanh(np.float32(0.5) * sample + np.float32(0.1 * t / 1000.0)).astype(np.float32)


def learned_range_model(sample: np.ndarray, t: float) -> np.ndarray:
    """Stand-in for a model with ``variance_type="learned_range"``: prediction and variance channels stacked."""
    out = tanh_model(sample, t)
    return np.concatenate([out, np.float32(0.3) * out - np.float32(0.2)], axis=1)


@dataclass
class Case:
    """One parity case: a Diffusers class name, config overrides and ``set_timesteps`` keyword arguments."""

    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)
    set_timesteps: dict[str, Any] = field(default_factory=lambda: {"num_inference_steps": 10})
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # set for stochastic schedulers: the same seed drives both generators
    begin_index: int | None = None  # start mid-schedule, img2img style: add_noise at that step, set_begin_index
    model: Model = tanh_model
    shape: tuple[int, ...] = SHAPE

    def __str__(self) -> str:
        parts = [self.scheduler] + [f"{k}={_short(v)}" for k, v in {**self.config, **self.set_timesteps,
                                                                    **self.step_kwargs}.items()]
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        if self.begin_index is not None:
            parts.append(f"begin={self.begin_index}")
        return "-".join(parts)

    def replace(self, **changes: Any) -> Case:
        return dataclasses.replace(self, **changes)


@dataclass
class LoopResult:
    timesteps: np.ndarray
    sigmas: np.ndarray | None
    sample: np.ndarray
    init_noise_sigma: float
    trace: list[np.ndarray]  # the initial sample, then prev_sample after each step

    @property
    def scale(self) -> float:
        """Largest magnitude along the run."""
        return max(float(np.max(np.abs(x))) for x in self.trace)


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return f"[{len(value)}]"
    return str(value)


def _initial(case: Case) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    return (rng.standard_normal(case.shape, dtype=np.float32),
            rng.standard_normal(case.shape, dtype=np.float32))


def run_diffusers(case: Case, config: dict[str, Any] | None = None) -> LoopResult:
    """The reference loop with the installed diffusers (torch float32, CPU)."""
    import diffusers
    import torch

    cls = getattr(diffusers, case.scheduler)
    scheduler = cls.from_config({**(config or {}), **case.config})
    scheduler.set_timesteps(**_torch_kwargs(case.set_timesteps))
    generator = torch.Generator("cpu").manual_seed(case.seed) if case.seed is not None else None
    noise, image = (torch.from_numpy(a) for a in _initial(case))

    def model(x: Any, t: Any) -> Any:
        return torch.from_numpy(case.model(x.numpy(), float(t)))

    kwargs = dict(case.step_kwargs)
    if generator is not None and _accepts_generator(scheduler):
        kwargs["generator"] = generator
    sample, timesteps = _start(scheduler, case, noise, image, lambda t: torch.as_tensor(t).reshape(1))
    trace = [sample.numpy().copy()]
    for t in timesteps:
        out = scheduler.step(model(scheduler.scale_model_input(sample, t), t), t, sample, **kwargs)
        sample = out.prev_sample
        trace.append(sample.numpy().copy())
    sigmas = getattr(scheduler, "sigmas", None)
    return LoopResult(
        timesteps=scheduler.timesteps.numpy(),
        sigmas=None if sigmas is None else np.asarray(sigmas, dtype=np.float64),
        sample=sample.numpy(),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        trace=trace,
    )


def run_ours(case: Case, ours: type | None = None, config: dict[str, Any] | None = None) -> LoopResult:
    """Our loop: same config, same initial latents, same seed through ``diffrt.rng``."""
    if ours is None:
        from diffrt.schedulers import get_scheduler_class

        ours = get_scheduler_class(case.scheduler)
    scheduler = ours.from_config({**(config or {}), **case.config})
    scheduler.set_timesteps(**case.set_timesteps)
    kwargs = dict(case.step_kwargs)
    if case.seed is not None and _accepts_generator(scheduler):
        from diffrt.rng import Generator

        kwargs["generator"] = Generator("cpu").manual_seed(case.seed)
    noise, image = _initial(case)
    sample, timesteps = _start(scheduler, case, noise, image, lambda t: np.asarray(t).reshape(1))
    trace = [np.array(sample, copy=True)]
    for t in timesteps:
        out = scheduler.step(case.model(scheduler.scale_model_input(sample, t), float(t)), t, sample, **kwargs)
        sample = out.prev_sample
        trace.append(np.array(sample, copy=True))
    sigmas = getattr(scheduler, "sigmas", None)
    return LoopResult(
        timesteps=np.asarray(scheduler.timesteps),
        sigmas=None if sigmas is None else np.asarray(sigmas, dtype=np.float64),
        sample=np.asarray(sample),
        init_noise_sigma=float(scheduler.init_noise_sigma),
        trace=trace,
    )


def _accepts_generator(scheduler: Any) -> bool:
    """A seed is ignored by deterministic schedulers (their ``step`` has no ``generator``), on both sides."""
    return "generator" in inspect.signature(scheduler.step).parameters


def _start(scheduler: Any, case: Case, noise: Any, image: Any, as_batch: Callable) -> tuple[Any, Any]:
    """Initial sample and the timesteps to loop over: pure noise * init_noise_sigma, or (img2img) the image
    noised to ``begin_index`` with ``add_noise`` after ``set_begin_index``."""
    timesteps = scheduler.timesteps
    if case.begin_index is None:
        return noise * scheduler.init_noise_sigma, timesteps
    start = case.begin_index * scheduler.order
    if hasattr(scheduler, "set_begin_index"):  # Diffusers' DDIM / DDPM have none: they look timesteps up
        scheduler.set_begin_index(start)
    return scheduler.add_noise(image, noise, as_batch(timesteps[start])), timesteps[start:]


def _torch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}


SIGMA_DERIVED_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


# Second-order k-diffusion samplers whose midpoint timesteps are sigma->t of interpolated sigmas.
MIDPOINT_SCHEDULERS = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler")


def default_tolerances(case: Case) -> tuple[float, float, float]:
    """(timestep_rtol, sigma_rtol, sigma_atol) for a case: exact timesteps unless they are computed from sigmas
    (sigma->t interpolation on log sigmas inherits torch's sqrt rounding, see ``assert_parity``); looser sigmas under
    zero-terminal-SNR rescaling, whose float32 arithmetic (sqrt, square, ratio) amplifies those ulps: the
    smallest sigma, sqrt(1 - a) with a within ulps of 1, moves by up to ~1e-5 absolute (0.1% relative)."""
    derived = (any(case.config.get(k) for k in SIGMA_DERIVED_KEYS) or "sigmas" in case.set_timesteps
               or case.config.get("timestep_type") == "continuous"
               or case.scheduler in MIDPOINT_SCHEDULERS)
    if case.config.get("rescale_betas_zero_snr"):
        return (1e-6 if derived else 0.0), 3e-5, 2e-5
    return (1e-6 if derived else 0.0), 1e-6, 1e-7


def assert_parity(
    case: Case,
    ours: type | None = None,
    config: dict[str, Any] | None = None,
    rtol: float = 1e-5,
    timestep_rtol: float | None = None,
    sigma_rtol: float | None = None,
    sigma_atol: float | None = None,
) -> tuple[LoopResult, LoopResult]:
    """Run both loops and assert: timesteps equal (exactly unless ``timestep_rtol``), sigmas within
    ``sigma_rtol``, init_noise_sigma close, and final samples ``max|a - b| <= rtol * scale`` with
    ``scale = max(1, max |ref|)`` over the reference trajectory (initial sample included): float32 rounding
    error is relative to the largest magnitude a run carries, e.g. sigma_max = 4096 under zero terminal SNR.

    Why timesteps derived from sigmas (karras / exponential / beta / custom sigmas / continuous) need a
    ``timestep_rtol`` of about one float32 ulp: Diffusers takes sqrt of its float32 tables with torch, whose CPU
    build calls MKL VML in high-accuracy mode, which is not correctly rounded (1-ulp differences from NumPy's
    IEEE sqrt in ~20% of entries, and the MKL code path depends on the CPU). ``default_tolerances`` picks
    them from the case; explicit arguments override. Returns (reference, ours)."""
    default_t, default_sr, default_sa = default_tolerances(case)
    timestep_rtol = default_t if timestep_rtol is None else timestep_rtol
    sigma_rtol = default_sr if sigma_rtol is None else sigma_rtol
    sigma_atol = default_sa if sigma_atol is None else sigma_atol
    ref = run_diffusers(case, config)
    got = run_ours(case, ours, config)
    np.testing.assert_allclose(got.timesteps.astype(np.float64), ref.timesteps.astype(np.float64),
                               rtol=timestep_rtol, atol=1e-7 if timestep_rtol else 0,
                               err_msg=f"timesteps differ for {case}")
    if ref.sigmas is not None and got.sigmas is not None:
        np.testing.assert_allclose(got.sigmas, ref.sigmas, rtol=sigma_rtol, atol=sigma_atol,
                                   err_msg=f"sigmas differ for {case}")
    np.testing.assert_allclose(got.init_noise_sigma, ref.init_noise_sigma, rtol=sigma_rtol, atol=sigma_atol)
    assert len(got.trace) == len(ref.trace), f"step count differs for {case}"
    assert np.isfinite(ref.sample).all(), f"reference produced non-finite values for {case}"
    err = float(np.max(np.abs(got.sample.astype(np.float64) - ref.sample)))
    bound = rtol * max(1.0, ref.scale)
    assert err <= bound, f"final sample differs by {err:.3g} > {bound:.3g} for {case}"
    return ref, got
