"""Full-loop parity of EDM Euler, EDM DPM-Solver++ and Flow-Match Euler with Diffusers, plus their error paths.

EDM cases run through ``scheduler_harness.assert_parity``. Tolerances: final samples within 1e-5 of the run's
sample scale; sigmas within 1e-6 relative (the exponential schedule takes exp of float32 values, where torch's
float32 exp and ours can differ by an ulp); EDM timesteps (c_noise = log(sigma) / 4) within 1e-6 relative, i.e.
one float32 ulp: torch computes that log with MKL VML, which is not correctly rounded (the harness explains the
same for sqrt), ours is the correctly rounded float64 log. Flow-match timesteps and sigmas are exact.

Diffusers' Flow-Match scheduler has no ``scale_model_input`` / ``init_noise_sigma`` (flow pipelines skip both), so
its loop is run here with the harness's model and latents: ``set_timesteps``, then per timestep model -> ``step``.
"""
from __future__ import annotations

import itertools
import logging

import diffusers
import numpy as np
import pytest
import torch
from scheduler_harness import Case, _initial, assert_parity, run_diffusers, run_ours

from diffrt.errors import ConfigError, InputError
from diffrt.rng import Generator
from diffrt.schedulers import (
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

EDM_TOLERANCE = {"timestep_rtol": 1e-6, "sigma_rtol": 1e-6}
SCHEDULES = ["karras", "exponential"]
PREDICTIONS = ["epsilon", "v_prediction"]
COSXL = {"sigma_min": 0.0292, "sigma_max": 14.6146, "sigma_data": 1.0, "sigma_schedule": "exponential",
         "prediction_type": "v_prediction"}  # stabilityai/cosxl's scheduler config
PLAYGROUND = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "sigma_schedule": "karras",
              "final_sigmas_type": "zero", "solver_order": 2}  # playground-v2.5's EDM DPM-Solver config


def steps(n: int) -> dict:
    return {"num_inference_steps": n}


# ------------------------------------------------------------------------------------------------------ EDM Euler
EDM_EULER = [
    Case("EDMEulerScheduler", {"sigma_schedule": s, "prediction_type": p}, steps(n))
    for s, p, n in itertools.product(SCHEDULES, PREDICTIONS, [1, 2, 10, 25])
] + [
    Case("EDMEulerScheduler", {"sigma_schedule": s, "final_sigmas_type": "sigma_min"}, steps(10)) for s in SCHEDULES
] + [
    Case("EDMEulerScheduler", COSXL, steps(20)),
    Case("EDMEulerScheduler", {"sigma_data": 1.0, "rho": 5.0, "sigma_max": 120.0}, steps(12)),
    Case("EDMEulerScheduler", {}, steps(10), step_kwargs={"s_churn": 1.0, "s_tmin": 0.05, "s_tmax": 50.0}, seed=3),
    Case("EDMEulerScheduler", COSXL, steps(10), step_kwargs={"s_churn": 0.5, "s_noise": 1.003}, seed=4),
    Case("EDMEulerScheduler", {}, steps(10), begin_index=4),
]


@pytest.mark.parametrize("case", EDM_EULER, ids=str)
def test_edm_euler_matches_diffusers(case: Case) -> None:
    assert_parity(case, **EDM_TOLERANCE)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_edm_euler_custom_ramp_matches_diffusers(schedule: str, final: str) -> None:
    """``sigmas=`` are ramp positions along the schedule in Diffusers' EDM Euler (0 -> sigma_max)."""
    ramp = np.array([0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
    config = {"sigma_schedule": schedule, "final_sigmas_type": final}
    ref = diffusers.EDMEulerScheduler.from_config(config)
    ref.set_timesteps(sigmas=torch.from_numpy(ramp))
    ours = EDMEulerScheduler.from_config(config)
    ours.set_timesteps(sigmas=ramp)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-7)
    assert ours.num_inference_steps == len(ramp)


def test_edm_tables_before_set_timesteps_match_diffusers() -> None:
    for name, cls in [("EDMEulerScheduler", EDMEulerScheduler),
                      ("EDMDPMSolverMultistepScheduler", EDMDPMSolverMultistepScheduler)]:
        for schedule in SCHEDULES:
            ref = getattr(diffusers, name)(sigma_schedule=schedule)
            ours = cls(sigma_schedule=schedule)
            np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0, err_msg=name)
            np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
            assert ours.init_noise_sigma == ref.init_noise_sigma


def test_edm_preconditioning_matches_diffusers() -> None:
    """c_in and x0 = c_skip x + c_out F agree to a float32 ulp on a spread of sigmas (torch's float32
    (.) ** 0.5 is not always correctly rounded, NumPy's sqrt is)."""
    ref = diffusers.EDMEulerScheduler(sigma_data=0.7, prediction_type="v_prediction")
    ours = EDMEulerScheduler(sigma_data=0.7, prediction_type="v_prediction")
    rng = np.random.default_rng(0)
    x, f = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    for sigma in np.float32([0.002, 0.03, 0.5, 1.0, 7.3, 80.0]):
        tsigma = torch.tensor(sigma)
        np.testing.assert_allclose(ours.precondition_inputs(x, sigma),
                                   ref.precondition_inputs(torch.from_numpy(x), tsigma).numpy(), rtol=3e-7, atol=0)
        x0 = ref.precondition_outputs(torch.from_numpy(x), torch.from_numpy(f), tsigma).numpy()
        np.testing.assert_allclose(ours.precondition_outputs(x, f, sigma), x0, rtol=0, atol=3e-7 * np.abs(x0).max())


# ------------------------------------------------------------------------------------------------ EDM DPM-Solver++
def _dpm_cases() -> list[Case]:
    name = "EDMDPMSolverMultistepScheduler"
    cases = [Case(name, {"sigma_schedule": s, "prediction_type": p, "solver_order": o}, steps(n))
             for s, p, o, n in itertools.product(SCHEDULES, PREDICTIONS, [1, 2, 3], [1, 4, 20])]
    cases += [Case(name, {"solver_type": "heun", "solver_order": o}, steps(n))
              for o, n in itertools.product([2, 3], [8, 20])]
    cases += [Case(name, {"algorithm_type": "sde-dpmsolver++", "solver_type": t, "solver_order": o,
                          "sigma_schedule": s}, steps(n), seed=o + n)
              for t, o, s, n in itertools.product(["midpoint", "heun"], [1, 2], SCHEDULES, [4, 20])]
    cases += [
        Case(name, {"final_sigmas_type": "sigma_min"}, steps(n)) for n in [5, 20]
    ] + [
        Case(name, {"final_sigmas_type": "sigma_min", "solver_type": "heun"}, steps(5)),
        Case(name, {"lower_order_final": False, "solver_order": 3}, steps(10)),
        Case(name, {"euler_at_final": True}, steps(20)),
        Case(name, {"thresholding": True, "sample_max_value": 1.5}, steps(10)),
        Case(name, {**COSXL}, steps(20)),
        Case(name, PLAYGROUND, steps(25)),
        Case(name, {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"}, steps(10)),
        Case(name, {}, steps(10), begin_index=3),
        Case(name, {"solver_order": 3}, steps(12), begin_index=2),
    ]
    return cases


@pytest.mark.parametrize("case", _dpm_cases(), ids=str)
def test_edm_dpm_solver_matches_diffusers(case: Case) -> None:
    assert_parity(case, **EDM_TOLERANCE)


@pytest.mark.parametrize("config", [{"sigma_schedule": "exponential", "sigma_min": 0.01}, {}], ids=str)
def test_edm_dpm_solver_zero_length_last_step_is_exact(config: dict) -> None:
    """With ``final_sigmas_type="sigma_min"`` over 15+ steps the schedule ends on sigma_min twice (exactly, or 1 ulp
    apart with equal float32 lambdas): a step of length h = 0. We take it at first order, its exact result, x
    (nearly) unchanged; Diffusers' heun rule computes 0 / 0 there and ends in NaN. Every step before matches."""
    case = Case("EDMDPMSolverMultistepScheduler", {**config, "final_sigmas_type": "sigma_min", "solver_type": "heun"},
                steps(20))
    ref, got = run_diffusers(case), run_ours(case)
    last_lambdas = -np.log(got.sigmas[-2:].astype(np.float32))
    assert last_lambdas[0] == last_lambdas[1], "the schedule no longer ends on a zero-length step"
    for i, (a, b) in enumerate(zip(got.trace[:-1], ref.trace[:-1])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, ref.scale), err_msg=f"step {i}")
    assert np.isfinite(got.sample).all()
    np.testing.assert_allclose(got.trace[-1], got.trace[-2], rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------- Flow match
def _flow_loop(scheduler, case: Case, backend: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(timesteps, sigmas, final sample, scale) of a flow-matching loop on either backend."""
    tensor = torch.from_numpy if backend == "torch" else np.asarray
    kwargs = {k: (torch.tensor(v) if backend == "torch" and isinstance(v, np.ndarray) else v)
              for k, v in case.step_kwargs.items()}
    if case.seed is not None:
        kwargs["generator"] = (torch.Generator("cpu").manual_seed(case.seed) if backend == "torch"
                               else Generator("cpu").manual_seed(case.seed))
    scheduler.set_timesteps(**case.set_timesteps)
    noise, image = (tensor(a) for a in _initial(case))
    timesteps = scheduler.timesteps
    sample = noise
    if case.begin_index is not None:
        scheduler.set_begin_index(case.begin_index)
        start = timesteps[case.begin_index].reshape(1)
        sample, timesteps = scheduler.scale_noise(image, start, noise), timesteps[case.begin_index:]
    scale = float(np.abs(np.asarray(sample)).max())
    for t in timesteps:
        out = tensor(case.model(np.asarray(sample), float(t)))
        sample = scheduler.step(out, t, sample, **kwargs).prev_sample
        scale = max(scale, float(np.abs(np.asarray(sample)).max()))
    as_np = (lambda a: a.numpy()) if backend == "torch" else np.asarray
    return as_np(scheduler.timesteps), as_np(scheduler.sigmas), as_np(sample), scale


def assert_flow_parity(case: Case, rtol: float = 1e-5) -> None:
    ref = _flow_loop(diffusers.FlowMatchEulerDiscreteScheduler.from_config(case.config), case, "torch")
    got = _flow_loop(FlowMatchEulerDiscreteScheduler.from_config(case.config), case, "numpy")
    np.testing.assert_array_equal(got[0], ref[0], err_msg=f"timesteps differ for {case}")
    np.testing.assert_array_equal(got[1], ref[1], err_msg=f"sigmas differ for {case}")
    assert np.isfinite(ref[2]).all()
    err, bound = float(np.max(np.abs(got[2].astype(np.float64) - ref[2]))), rtol * max(1.0, ref[3])
    assert err <= bound, f"final sample differs by {err:.3g} > {bound:.3g} for {case}"


FLOW = "FlowMatchEulerDiscreteScheduler"
CUSTOM_SIGMAS = np.linspace(1.0, 1 / 12, 12)  # Flux's default sigmas for 12 steps
FLOW_CASES = [
    Case(FLOW, {"shift": s}, steps(n)) for s, n in itertools.product([1.0, 3.0], [1, 4, 28])
] + [
    Case(FLOW, {"use_dynamic_shifting": True, "time_shift_type": k}, {"num_inference_steps": n, "mu": mu})
    for k, n, mu in itertools.product(["exponential", "linear"], [4, 28], [0.5, 1.15])
] + [
    Case(FLOW, {"shift": 3.0, flag: True}, steps(n))
    for flag, n in itertools.product(["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"], [1, 10])
] + [
    Case(FLOW, {"shift": 3.0, "invert_sigmas": True}, steps(10)),
    Case(FLOW, {"shift": 2.0, "shift_terminal": 0.1}, steps(10)),
    Case(FLOW, {"use_dynamic_shifting": True, "shift_terminal": 0.02}, {"num_inference_steps": 12, "mu": 0.9}),
    Case(FLOW, {"shift": 3.0, "stochastic_sampling": True}, steps(10), seed=11),
    Case(FLOW, {"shift": 3.0}, {"sigmas": CUSTOM_SIGMAS}),
    Case(FLOW, {"use_dynamic_shifting": True}, {"sigmas": CUSTOM_SIGMAS, "mu": 1.05}),
    Case(FLOW, {"shift": 3.0}, {"timesteps": CUSTOM_SIGMAS * 1000}),
    Case(FLOW, {"shift": 3.0}, {"timesteps": CUSTOM_SIGMAS * 900, "sigmas": CUSTOM_SIGMAS}),
    Case(FLOW, {"shift": 3.0}, {"num_inference_steps": 12, "sigmas": CUSTOM_SIGMAS}),
    Case(FLOW, {"shift": 3.0}, steps(10), begin_index=4),
    Case(FLOW, {"shift": 1.0}, {"num_inference_steps": 10, "mu": 3.0}),  # mu without dynamic shifting: ignored
]


@pytest.mark.parametrize("case", FLOW_CASES, ids=str)
def test_flow_match_matches_diffusers(case: Case) -> None:
    assert_flow_parity(case)


def test_flow_match_per_token_timesteps_match_diffusers() -> None:
    """Per-token stepping (each token from its own sigma to the next lower schedule sigma), on a (batch, tokens,
    channels) sample."""
    rng = np.random.default_rng(2)
    sample = rng.standard_normal((2, 6, 3), dtype=np.float32)
    model_output = np.tanh(rng.standard_normal((2, 6, 3), dtype=np.float32))
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    per_token = np.sort(rng.uniform(100, 1000, (2, 6)).astype(np.float32), axis=1)[:, ::-1].copy()
    t = ours.timesteps[2]
    expected = ref.step(torch.from_numpy(model_output), torch.tensor(t), torch.from_numpy(sample),
                        per_token_timesteps=torch.from_numpy(per_token)).prev_sample.numpy()
    got = ours.step(model_output, t, sample, per_token_timesteps=per_token).prev_sample
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_flow_match_set_shift_changes_only_that_instance() -> None:
    ours = FlowMatchEulerDiscreteScheduler(shift=1.0)
    clone = ours.clone()
    clone.set_shift(3.0)
    ours.set_timesteps(6)
    clone.set_timesteps(6)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref.set_shift(3.0)
    ref.set_timesteps(6)
    assert ours.shift == 1.0 and clone.shift == 3.0
    np.testing.assert_array_equal(clone.sigmas, ref.sigmas.numpy())
    assert not np.array_equal(ours.sigmas, clone.sigmas)


def test_flow_match_add_noise_is_scale_noise() -> None:
    ours = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(5)
    x, noise = _initial(Case(FLOW))
    t = ours.timesteps[2:3]
    sigma = ours.sigmas[2]
    np.testing.assert_allclose(ours.add_noise(x, noise, t), sigma * noise + (1 - sigma) * x, rtol=1e-6)
    assert ours.scale_model_input(x, t[0]) is x and ours.init_noise_sigma == 1.0


# ------------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
@pytest.mark.parametrize("config, message", [
    ({"sigma_schedule": "linear"}, "`sigma_schedule` must be one of 'karras', 'exponential'"),
    ({"prediction_type": "sample"}, "`prediction_type` must be one of 'epsilon', 'v_prediction'"),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, "`sigma_min / sigma_max` must be 0 < sigma_min < sigma_max"),
    ({"sigma_data": 0.0}, "`sigma_data / rho` must be both > 0"),
    ({"final_sigmas_type": "one"}, "`final_sigmas_type` must be one of 'zero', 'sigma_min'"),
])
def test_edm_rejects_invalid_config(cls: type, config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cls(**config)


def test_edm_dpm_solver_rejects_unsupported_solvers() -> None:
    with pytest.raises(ConfigError, match="`algorithm_type` must be one of 'dpmsolver\\+\\+', 'sde-dpmsolver\\+\\+'"):
        EDMDPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ConfigError, match="`solver_order` must be 1 or 2 for algorithm_type 'sde-dpmsolver\\+\\+'"):
        EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    with pytest.raises(InputError, match="`num_inference_steps` must be an int >= 1; got None"):
        EDMDPMSolverMultistepScheduler().set_timesteps()
    with pytest.raises(InputError, match="`sigmas` must be None \\(EDM DPM-Solver builds its schedule"):
        EDMDPMSolverMultistepScheduler().set_timesteps(sigmas=[80.0, 1.0, 0.0])


@pytest.mark.parametrize("cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_edm_refuses_custom_timesteps_by_name(cls: type) -> None:
    with pytest.raises(InputError, match="`timesteps` must be None for EDM schedulers"):
        cls().set_timesteps(timesteps=[1.0, 0.0])


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of `num_inference_steps`, `sigmas` must be given; got none"),
    ({"num_inference_steps": 4, "sigmas": [0.0, 1.0]}, "exactly one of .* got both"),
    ({"sigmas": [0.0, 1.5]}, "`sigmas` must be strictly ascending ramp positions in \\[0, 1\\]"),
    ({"sigmas": [0.5, 0.2]}, "`sigmas` must be strictly ascending ramp positions"),
    ({"num_inference_steps": 0}, "`num_inference_steps` must be an int >= 1; got 0"),
])
def test_edm_euler_rejects_invalid_schedule_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        EDMEulerScheduler().set_timesteps(**kwargs)


def test_edm_steps_check_their_inputs() -> None:
    ours = EDMEulerScheduler()
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(InputError, match="call `set_timesteps` before `step`"):
        ours.step(x, ours.timesteps[0], x)
    ours.set_timesteps(4)
    with pytest.raises(InputError, match="not an integer index; got 0"):
        ours.step(x, 0, x)
    with pytest.raises(InputError, match="`model_output` must be finite; got 1 NaN/Inf values at step 0"):
        bad = x.copy()
        bad[0, 0, 0, 0] = np.nan
        ours.step(bad, ours.timesteps[0], x)


def test_edm_reads_none_sigma_range_of_euler_configs_as_edm_defaults() -> None:
    """Euler configs saved by Diffusers (SDXL's, for one) carry "sigma_min": null, "sigma_max": null; EDM takes
    its defaults for them (Diffusers fails on None ** (1 / rho))."""
    saved = {**EulerDiscreteScheduler(prediction_type="v_prediction").config, "sigma_min": None, "sigma_max": None}
    for cls in (EDMEulerScheduler, EDMDPMSolverMultistepScheduler):
        edm = cls.from_config(saved)
        assert (edm.config.sigma_min, edm.config.sigma_max, edm.config.prediction_type) == \
            (0.002, 80.0, "v_prediction")
        np.testing.assert_array_equal(edm.sigmas, cls(prediction_type="v_prediction").sigmas)


@pytest.mark.parametrize("config, kwargs, error, message", [
    ({"use_dynamic_shifting": True}, {"num_inference_steps": 4}, InputError,
     "`mu` must be a finite float when `use_dynamic_shifting` is True; got None"),
    ({}, {}, InputError, "one of `num_inference_steps`, `sigmas`, `timesteps` must be given; got none"),
    ({}, {"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, InputError,
     "`sigmas` must be `num_inference_steps` = 3 values when both are given; got 2"),
    ({}, {"timesteps": [900.0, 500.0], "sigmas": [1.0, 0.5, 0.2]}, InputError,
     "`timesteps` must be as many values as `sigmas` \\(3\\); got 2"),
    ({}, {"sigmas": [1.0, 0.5, 0.0]}, InputError, "the final 0 is appended by the scheduler"),
    ({}, {"sigmas": [1.5, 0.5]}, InputError,
     "`sigmas` must be a non-empty, strictly descending sequence in \\(0, 1\\]"),
    ({}, {"timesteps": [500.0, 700.0]}, InputError, "`timesteps` must be a non-empty, strictly descending"),
    ({}, {"num_inference_steps": 2.5}, InputError, "`num_inference_steps` must be an int >= 1; got 2.5"),
])
def test_flow_match_rejects_invalid_schedule_arguments(config: dict, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        FlowMatchEulerDiscreteScheduler(**config).set_timesteps(**kwargs)


def test_flow_match_rejects_invalid_config_and_steps() -> None:
    with pytest.raises(ConfigError, match="`time_shift_type` must be one of 'exponential', 'linear'; got 'cubic'"):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cubic")
    with pytest.raises(ConfigError, match="at most one True"):
        FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ConfigError, match="`shift` must be > 0; got 0"):
        FlowMatchEulerDiscreteScheduler(shift=0)
    with pytest.raises(InputError, match="`shift` must be > 0; got -1"):
        FlowMatchEulerDiscreteScheduler().set_shift(-1)
    ours = FlowMatchEulerDiscreteScheduler()
    ours.set_timesteps(3)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(InputError, match="not an integer index; got 1"):
        ours.step(x, 1, x)


def test_flow_match_warns_when_timesteps_come_without_sigmas(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diffrt.schedulers.flow_match"):
        FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(timesteps=[900.0, 500.0, 100.0])
    assert "`timesteps` without `sigmas`" in caplog.text
