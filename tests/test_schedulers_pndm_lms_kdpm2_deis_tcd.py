"""Full-loop parity of the PNDM, LMS, KDPM2, KDPM2 Ancestral, DEIS, TCD schedulers with Diffusers.

Every case runs the installed Diffusers scheduler (torch, CPU float32) and ours side by side through
``scheduler_harness``: timesteps equal, final samples within 1e-5 of the run's sample scale; stochastic cases share
the seed (torch.Generator("cpu") vs diffrt.rng.Generator). Our extensions (custom timesteps / sigmas where
Diffusers has none) are checked against the Diffusers run whose schedule they reproduce.

KDPM2's midpoint timesteps are derived from sigmas (sigma -> t of sqrt(sigma_i sigma_j)), so they carry torch's
MKL sqrt/log/exp ulps: compared within 1e-6 relative, and the ancestral variant's within 1e-3 absolute as well
(its sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels catastrophically near sigma_min, moving a midpoint by
up to ~2e-4 of a training step). Most KDPM2 cases use 250 training steps: Diffusers' KDPM2 constructor runs an
O(T^2) Python loop (1-2 s at T = 1000), so T = 1000 runs once per class.
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from scheduler_harness import Case, assert_parity, run_diffusers, run_ours

import diffrt.schedulers as schedulers
from diffrt.errors import ConfigError
from diffrt.rng import Generator
from diffrt.schedulers.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from diffrt.schedulers.lms import LMSDiscreteScheduler, lms_coefficients

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Diffusers' LMS warns about scale_model_input

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SPACINGS = [{"timestep_spacing": "linspace"}, {"timestep_spacing": "leading", "steps_offset": 1},
            {"timestep_spacing": "trailing"}]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SIGMA_KINDS = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]
SMALL_T = {"num_train_timesteps": 250}
OURS = ["PNDMScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
        "DEISMultistepScheduler", "TCDScheduler"]
STOCHASTIC = {"KDPM2AncestralDiscreteScheduler", "TCDScheduler"}


def steps(n: int) -> dict:
    return {"num_inference_steps": n}


def assert_same_run(ours_case: Case, ref_case: Case, timestep_rtol: float = 0.0, timestep_atol: float = 0.0,
                    rtol: float = 1e-5) -> None:
    """Our run of ``ours_case`` against Diffusers' run of ``ref_case`` (the same schedule reached another way, or
    the same case with a timestep tolerance the harness cannot express): timesteps within the given tolerance,
    same step count, final samples within ``rtol`` of the reference's scale, as ``assert_parity`` bounds them."""
    ref, got = run_diffusers(ref_case), run_ours(ours_case)
    np.testing.assert_allclose(got.timesteps.astype(np.float64), ref.timesteps.astype(np.float64),
                               rtol=timestep_rtol, atol=timestep_atol, err_msg=f"timesteps differ for {ours_case}")
    assert len(got.trace) == len(ref.trace), f"step count differs for {ours_case}"
    err = float(np.max(np.abs(got.sample.astype(np.float64) - ref.sample)))
    bound = rtol * max(1.0, ref.scale)
    assert err <= bound, f"final sample differs by {err:.3g} > {bound:.3g} for {ours_case}"


# ------------------------------------------------------------------------------------------------------- PNDM
PNDM = [Case("PNDMScheduler", {"skip_prk_steps": skip, **spacing}, steps(10))
        for skip, spacing in itertools.product([False, True], SPACINGS)] + [
    Case("PNDMScheduler", {}, steps(4)),  # the shortest PRK schedule: 12 PRK calls + 1 PLMS
    Case("PNDMScheduler", {"skip_prk_steps": True}, steps(1)),
    Case("PNDMScheduler", {"skip_prk_steps": True}, steps(2)),
    Case("PNDMScheduler", {**SD, "prediction_type": "v_prediction", "set_alpha_to_one": True}, steps(7)),
    Case("PNDMScheduler", {**SD, "skip_prk_steps": True, "prediction_type": "v_prediction", "steps_offset": 1},
         steps(25)),
    Case("PNDMScheduler", {"beta_schedule": "squaredcos_cap_v2", "skip_prk_steps": True,
                           "timestep_spacing": "trailing"}, steps(12)),
    Case("PNDMScheduler", {**SD, "skip_prk_steps": True, "steps_offset": 1}, steps(10), begin_index=3),
]

# -------------------------------------------------------------------------------------------------------- LMS
LMS = [Case("LMSDiscreteScheduler", {**SD, **spacing, "prediction_type": p}, steps(5))
       for spacing, p in itertools.product(SPACINGS, PREDICTIONS)] + [
    Case("LMSDiscreteScheduler", {kind: True}, steps(n)) for kind, n in itertools.product(SIGMA_KINDS[:2], [1, 8])
] + [
    Case("LMSDiscreteScheduler", {**SD, "use_beta_sigmas": True}, steps(6)),
    Case("LMSDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}, steps(6)),
    Case("LMSDiscreteScheduler", SD, steps(8), begin_index=2),
] + [Case("LMSDiscreteScheduler", SD, steps(8), step_kwargs={"order": k}) for k in (1, 2, 3)]

# ------------------------------------------------------------------------------------------------------- DEIS
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
DEIS = [Case("DEISMultistepScheduler", {"solver_order": o}, steps(n)) for o, n in itertools.product([1, 2, 3],
                                                                                                    [1, 5, 16])] + [
    Case("DEISMultistepScheduler", {**SD, **spacing, "prediction_type": p, "solver_order": 3}, steps(12))
    for spacing, p in itertools.product(SPACINGS, PREDICTIONS)
] + [Case("DEISMultistepScheduler", {**SD, kind: True, "solver_order": 3}, steps(8)) for kind in SIGMA_KINDS] + [
    Case("DEISMultistepScheduler", {**SD, "solver_order": 3, "lower_order_final": False}, steps(10)),
    Case("DEISMultistepScheduler", {"solver_order": 3, "thresholding": True, "sample_max_value": 1.5}, steps(10)),
    Case("DEISMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "solver_order": 3}, steps(10)),
    Case("DEISMultistepScheduler", {**SD, "solver_order": 3}, steps(10), begin_index=4),
]

# -------------------------------------------------------------------------------------------------------- TCD
TCD = [Case("TCDScheduler", {"prediction_type": p}, steps(4), step_kwargs={"eta": eta}, seed=11)
       for p, eta in itertools.product(PREDICTIONS, [0.0, 0.3, 1.0])] + [
    Case("TCDScheduler", {}, steps(1), seed=11),
    Case("TCDScheduler", {}, {"num_inference_steps": 8, "strength": 0.6}, seed=11),
    Case("TCDScheduler", {}, {"num_inference_steps": 4, "original_inference_steps": 100}, seed=11),
    Case("TCDScheduler", {}, {"timesteps": [999, 759, 499, 259]}, seed=11),
    Case("TCDScheduler", {}, {"timesteps": [999, 759, 499, 259], "strength": 0.5}, seed=11),
    Case("TCDScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                          "prediction_type": "v_prediction"}, steps(4), seed=11),
    Case("TCDScheduler", {"set_alpha_to_one": False, "beta_schedule": "linear"}, steps(6), seed=11),
    Case("TCDScheduler", {}, steps(6), seed=11, begin_index=2),
]


@pytest.mark.parametrize("case", PNDM + LMS + DEIS + TCD, ids=str)
def test_loop_matches_diffusers(case: Case) -> None:
    assert_parity(case)


@pytest.mark.parametrize("case", [
    Case("DEISMultistepScheduler", {**FLOW, "solver_order": 3}, steps(n)) for n in (2, 6, 16)
] + [Case("DEISMultistepScheduler", {"use_flow_sigmas": True, "use_dynamic_shifting": True,
                                     "prediction_type": "flow_prediction"}, {"num_inference_steps": 8, "mu": 0.8})],
    ids=str)
def test_deis_flow_sigmas_match_diffusers(case: Case) -> None:
    """Within 1e-4: the first flow sigma is 0.9997, so alpha_t / alpha_s ~ 750 and DEIS' eps-form update cancels
    two terms of that size; one float32 ulp in exp(h) (torch's and NumPy's float32 exp are both faithful, not
    identical) then moves the result by up to ~7e-5 of the sample scale, in either direction."""
    assert_parity(case, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ KDPM2
def kdpm2_cases(name: str) -> list[Case]:
    seed = 3 if name in STOCHASTIC else None
    cases = [Case(name, {**SMALL_T, **spacing}, steps(n), seed=seed) for spacing, n in zip(SPACINGS, [6, 1, 2])]
    cases += [Case(name, {**SMALL_T, **SD, kind: True}, steps(5), seed=seed) for kind in SIGMA_KINDS]
    cases += [Case(name, {**SMALL_T, **SD, "prediction_type": "v_prediction"}, steps(7), seed=seed),
              Case(name, {**SMALL_T, **SD}, steps(6), seed=seed, begin_index=2)]
    return cases


@pytest.mark.parametrize("case", kdpm2_cases("KDPM2DiscreteScheduler"), ids=str)
def test_kdpm2_loop_matches_diffusers(case: Case) -> None:
    assert_parity(case, timestep_rtol=1e-6)


@pytest.mark.parametrize("case", kdpm2_cases("KDPM2AncestralDiscreteScheduler"), ids=str)
def test_kdpm2_ancestral_loop_matches_diffusers(case: Case) -> None:
    assert_same_run(case, case, timestep_rtol=1e-6, timestep_atol=1e-3)
    ours = schedulers.KDPM2AncestralDiscreteScheduler.from_config(case.config)
    reference = diffusers.KDPM2AncestralDiscreteScheduler.from_config(case.config)
    ours.set_timesteps(**case.set_timesteps)
    reference.set_timesteps(**case.set_timesteps)
    for table in ("sigmas", "sigmas_up"):  # the tables the noise scale comes from
        np.testing.assert_allclose(getattr(ours, table), getattr(reference, table).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_default_training_length_matches_diffusers(name: str) -> None:
    case = Case(name, SD, steps(10), seed=5 if name in STOCHASTIC else None)
    assert_same_run(case, case, timestep_rtol=1e-6, timestep_atol=1e-3)


# -------------------------------------------------------------- our extensions, checked through equal schedules
def diffusers_timesteps(name: str, config: dict, n: int) -> list:
    reference = getattr(diffusers, name).from_config(config)
    reference.set_timesteps(n)
    return reference.timesteps.tolist()


@pytest.mark.parametrize("spacing", SPACINGS[1:], ids=lambda s: s["timestep_spacing"])
def test_pndm_custom_timesteps_and_sigmas_reproduce_a_plms_spacing(spacing: dict) -> None:
    """With leading / trailing spacing Diffusers' t - T // n is the next listed timestep, so PLMS over the list
    (ours) must equal that run; sigmas from the training table map back to the same timesteps."""
    config = {**SD, **spacing, "skip_prk_steps": True}
    unique = list(dict.fromkeys(diffusers_timesteps("PNDMScheduler", config, 10)))
    reference = Case("PNDMScheduler", config, steps(10))
    assert_same_run(reference.replace(set_timesteps={"timesteps": unique}), reference)
    table = schedulers.PNDMScheduler(**config).alphas_cumprod
    sigmas = [*np.sqrt((1 - table[unique]) / table[unique]).tolist(), 0.0]
    assert_same_run(reference.replace(set_timesteps={"sigmas": sigmas}), reference)


def test_lms_custom_sigmas_and_timesteps_reproduce_diffusers_schedules() -> None:
    karras = diffusers.LMSDiscreteScheduler(**SD, use_karras_sigmas=True)
    karras.set_timesteps(7)
    assert_same_run(Case("LMSDiscreteScheduler", SD, {"sigmas": karras.sigmas.tolist()}),
                    Case("LMSDiscreteScheduler", {**SD, "use_karras_sigmas": True}, steps(7)), timestep_rtol=1e-6)
    leading = {**SD, **SPACINGS[1]}
    assert_same_run(Case("LMSDiscreteScheduler", leading, {"timesteps": diffusers_timesteps(
        "LMSDiscreteScheduler", leading, 7)}), Case("LMSDiscreteScheduler", leading, steps(7)))


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_custom_sigmas_and_timesteps_reproduce_diffusers_schedules(name: str) -> None:
    """Custom lists are the interval ends: Diffusers' table repeats each interior sigma, so take every other one."""
    exponential = getattr(diffusers, name)(**SMALL_T, **SD, use_exponential_sigmas=True)
    exponential.set_timesteps(5)
    table = exponential.sigmas.numpy()
    sigmas = [table[0], *table[1:-1:2]]  # sigma_0, then sigma_1 .. sigma_n (the final 0)
    seed = 4 if name in STOCHASTIC else None
    assert_same_run(Case(name, {**SMALL_T, **SD}, {"sigmas": sigmas}, seed=seed),
                    Case(name, {**SMALL_T, **SD, "use_exponential_sigmas": True}, steps(5), seed=seed),
                    timestep_rtol=1e-6, timestep_atol=1e-3)
    leading = {**SMALL_T, **SD, **SPACINGS[1]}
    main_timesteps = diffusers_timesteps(name, leading, 5)[::2]
    assert_same_run(Case(name, leading, {"timesteps": main_timesteps}, seed=seed),
                    Case(name, leading, steps(5), seed=seed), timestep_rtol=1e-6, timestep_atol=1e-3)


def test_deis_custom_timesteps_and_sigmas_reproduce_diffusers_schedules() -> None:
    config = {**SD, "solver_order": 3}
    reference = diffusers.DEISMultistepScheduler(**config)
    reference.set_timesteps(9)
    base = Case("DEISMultistepScheduler", config, steps(9))
    assert_same_run(base.replace(set_timesteps={"timesteps": reference.timesteps.tolist()}), base)
    assert_same_run(base.replace(set_timesteps={"sigmas": reference.sigmas.tolist()}), base)


def test_tcd_custom_sigmas_map_to_the_timesteps_they_come_from() -> None:
    timesteps = [999, 759, 499, 259]
    table = schedulers.TCDScheduler().alphas_cumprod
    sigmas = [*np.sqrt((1 - table[timesteps]) / table[timesteps]).tolist(), 0.0]
    reference = Case("TCDScheduler", {}, {"timesteps": timesteps}, seed=8)
    assert_same_run(reference.replace(set_timesteps={"sigmas": sigmas}), reference)


# ------------------------------------------------------------------------------------------------- unit oracles
def test_lms_coefficients_match_diffusers_scipy_quadrature() -> None:
    """Our exact polynomial integrals against Diffusers' scipy.integrate.quad over the same float32 sigmas."""
    for config in ({}, {"use_karras_sigmas": True}, SD):
        reference, ours = diffusers.LMSDiscreteScheduler(**config), LMSDiscreteScheduler(**config)
        reference.set_timesteps(9)
        ours.set_timesteps(9)
        for order in (1, 2, 3, 4):
            for t in range(order - 1, 9):
                expected = [reference.get_lms_coefficient(order, t, j) for j in range(order)]
                np.testing.assert_allclose(lms_coefficients(ours.sigmas, t, order), expected, rtol=1e-5)


@pytest.mark.parametrize("name", OURS)
def test_add_noise_matches_diffusers(name: str) -> None:
    config = {**SMALL_T, **SD} if name.startswith("KDPM2") else SD
    ours, reference = schedulers.get_scheduler_class(name)(**config), getattr(diffusers, name)(**config)
    ours.set_timesteps(6)
    reference.set_timesteps(6)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 4, 8, 8), dtype=np.float32) for _ in range(2))
    picked = ours.timesteps[[0, 2, 4]]  # even positions: KDPM2's main (not midpoint) timesteps
    expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(picked)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, picked), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", OURS)
def test_compatibles_are_diffusers_compatibles_that_diffrt_implements(name: str) -> None:
    expected = {name} | {n for n in getattr(diffusers, name)._compatibles if n in schedulers.registered_names()}
    assert {c.__name__ for c in schedulers.get_scheduler_class(name)().compatibles} == expected


@pytest.mark.parametrize("name", OURS)
def test_saved_config_loads_back_in_diffrt_and_diffusers(name: str, tmp_path) -> None:
    cls = schedulers.get_scheduler_class(name)
    scheduler = cls(**(SMALL_T if name.startswith("KDPM2") else {}), **SD, prediction_type="v_prediction")
    scheduler.save_config(tmp_path)
    assert cls.from_config(tmp_path).config == scheduler.config
    reference = getattr(diffusers, name)
    loaded = reference.from_config(reference.load_config(tmp_path))
    assert all(loaded.config[k] == v for k, v in scheduler.config.items() if not k.startswith("_"))


def test_deis_loads_dpm_solver_configs_like_diffusers() -> None:
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_type="heun")
    ours = schedulers.DEISMultistepScheduler.from_config(dpm.config)
    reference = diffusers.DEISMultistepScheduler.from_config(dpm.config)
    assert (ours.config.algorithm_type, ours.config.solver_type) == ("deis", "logrho")
    assert (reference.config.algorithm_type, reference.config.solver_type) == ("deis", "logrho")


@pytest.mark.parametrize("name", OURS)
def test_clones_run_independently(name: str) -> None:
    """Two clones stepped alternately give the same result as one run alone: no state is shared."""
    config = {**SMALL_T, **SD} if name.startswith("KDPM2") else SD
    scheduler = schedulers.get_scheduler_class(name).from_config(config)
    scheduler.set_timesteps(5)

    def start(s):
        generator = Generator().manual_seed(6) if name in STOCHASTIC else None
        x = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32) * s.init_noise_sigma
        return s, x, generator

    def advance(s, x, generator, t):
        kwargs = {"generator": generator} if generator is not None else {}
        return s.step(np.tanh(s.scale_model_input(x, t)), t, x, **kwargs).prev_sample

    alone = start(scheduler.clone())
    x_alone = alone[1]
    for t in scheduler.timesteps:
        x_alone = advance(alone[0], x_alone, alone[2], t)
    (a, xa, ga), (b, xb, gb) = start(scheduler.clone()), start(scheduler.clone())
    for t in scheduler.timesteps:
        xa, xb = advance(a, xa, ga, t), advance(b, xb, gb, t)
    np.testing.assert_array_equal(xa, x_alone)
    np.testing.assert_array_equal(xb, x_alone)


def test_modules_import_neither_torch_nor_scipy() -> None:
    code = ("import sys\n"
            "from diffrt.schedulers import " + ", ".join(OURS) + "\n"
            "for cls in (" + ", ".join(OURS) + "):\n"
            "    s = cls(); s.set_timesteps(5)\n"
            "print([m for m in ('torch', 'transformers', 'diffusers', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------ bad input
def _pndm(**config):
    return schedulers.PNDMScheduler(**config)


def _scheduled(name: str, n: int = 4, **config):
    scheduler = schedulers.get_scheduler_class(name)(**config)
    scheduler.set_timesteps(n)
    return scheduler


X = np.zeros((1, 4, 8, 8), np.float32)
BAD = [
    ("prediction_type", lambda: _pndm(prediction_type="sample")),
    ("timesteps", lambda: _pndm().set_timesteps(timesteps=[900, 500, 100])),
    ("sigmas", lambda: _pndm().set_timesteps(sigmas=[10.0, 1.0, 0.0])),
    ("num_inference_steps", lambda: _pndm().set_timesteps(3)),
    ("begin_index", lambda: _pndm().set_begin_index(2)),
    ("timestep", lambda: _scheduled("PNDMScheduler", skip_prk_steps=True).step(X, 10.5, X)),
    ("order", lambda: _scheduled("LMSDiscreteScheduler").step(X, 999.0, X, order=0)),
    ("timesteps", lambda: LMSDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100])),
    ("use_karras_sigmas", lambda: LMSDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)),
    ("prediction_type", lambda: KDPM2DiscreteScheduler(prediction_type="sample")),
    ("num_train_timesteps", lambda: KDPM2AncestralDiscreteScheduler().set_timesteps(5, None, 500)),
    ("timestep", lambda: _scheduled("KDPM2DiscreteScheduler").step(X, 999, X)),
    ("algorithm_type", lambda: schedulers.DEISMultistepScheduler(algorithm_type="sde-dpmsolver++")),
    ("solver_order", lambda: schedulers.DEISMultistepScheduler(solver_order=4)),
    ("sigmas", lambda: schedulers.DEISMultistepScheduler().set_timesteps(sigmas=[10.0, 1.0, 0.0])),
    ("timesteps", lambda: schedulers.DEISMultistepScheduler(use_karras_sigmas=True).set_timesteps(
        timesteps=[900, 100])),
    ("mu", lambda: schedulers.DEISMultistepScheduler().set_timesteps(5, mu=0.5)),
    ("timestep", lambda: _scheduled("DEISMultistepScheduler").step(X, 1, X)),
    ("eta", lambda: _scheduled("TCDScheduler").step(X, 999, X, eta=1.5)),
    ("num_inference_steps", lambda: schedulers.TCDScheduler().set_timesteps(60)),
    ("strength", lambda: schedulers.TCDScheduler().set_timesteps(4, strength=0.0)),
]


@pytest.mark.parametrize("name, call", BAD, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BAD)])
def test_bad_input_names_the_parameter(name: str, call) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        call()


@pytest.mark.parametrize("name", ["PNDMScheduler", "DEISMultistepScheduler", "TCDScheduler"])
def test_step_before_set_timesteps_says_so(name: str) -> None:
    """(LMS and KDPM2 start, as in Diffusers, from the full training schedule, so they can step at once.)"""
    with pytest.raises(ValueError, match="set_timesteps"):
        schedulers.get_scheduler_class(name)().step(X, 999, X)


def test_config_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="`prediction_type`"):
        schedulers.KDPM2AncestralDiscreteScheduler(prediction_type="sample")
