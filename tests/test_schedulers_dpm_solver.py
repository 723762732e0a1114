"""DPMSolverMultistepScheduler against Diffusers (the installed version is the oracle).

Full loops run through the shared harness: timesteps must be equal, sigmas within the harness' float32 tolerances,
and the final sample within 1e-5 of the run's largest magnitude. The SDE variants use the same seed on both sides
(torch.Generator("cpu") vs diffrt.rng.Generator), so they are compared exactly like the ODE ones.
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_harness import Case, assert_parity, learned_range_model, run_diffusers, run_ours

from diffrt.rng import Generator
from diffrt.schedulers.dpm_solver import DPMSolverMultistepScheduler, noise_level

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

NAME = "DPMSolverMultistepScheduler"
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's betas
NOISE_FORM = {"final_sigmas_type": "sigma_min"}  # dpmsolver / sde-dpmsolver are undefined at sigma 0
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
PREDICTIONS = ("epsilon", "v_prediction", "sample")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # Diffusers deprecates the eps-form algorithms


def dpm_case(config: dict, steps: int | dict = 10, **kwargs) -> Case:
    """A harness case; eps-form algorithms get a sigma_min final sigma, SDE ones a seed."""
    algorithm = config.get("algorithm_type", "dpmsolver++")
    if algorithm in ("dpmsolver", "sde-dpmsolver"):
        config = {**NOISE_FORM, **config}
    set_timesteps = steps if isinstance(steps, dict) else {"num_inference_steps": steps}
    seed = 7 if algorithm.startswith("sde-") else None
    return Case(NAME, config, set_timesteps, seed=seed, **kwargs)


def check(case: Case, **kwargs):
    return assert_parity(case, ours=DPMSolverMultistepScheduler, **kwargs)


def diffusers_scheduler(**config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.DPMSolverMultistepScheduler(**config)


# ------------------------------------------------------------------------------------------------ parity matrix
SOLVERS = [(a, o, s) for a in ALGORITHMS for o in (1, 2, 3) for s in (("midpoint",) if o == 1 else ("midpoint", "heun"))
           if not (a == "sde-dpmsolver" and o == 3)]


@pytest.mark.parametrize("steps", [1, 5, 16])
@pytest.mark.parametrize("algorithm_type, solver_order, solver_type", SOLVERS)
def test_every_algorithm_order_and_solver_type_matches_diffusers(algorithm_type, solver_order, solver_type, steps):
    check(dpm_case({**SD, "algorithm_type": algorithm_type, "solver_order": solver_order,
                    "solver_type": solver_type}, steps))


SCHEDULES = [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
             {"use_lu_lambdas": True},
             {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}]
SCHEDULE_ALGORITHMS = [{"algorithm_type": "dpmsolver++", "solver_order": 3}, {"algorithm_type": "sde-dpmsolver++"},
                       {"algorithm_type": "dpmsolver", "solver_type": "heun"}]


# flow_prediction needs a data-prediction (++) algorithm, in Diffusers too
SCHEDULE_CASES = [pytest.param(s, a, id=f"{next(iter(s))}-{a['algorithm_type']}") for s in SCHEDULES
                  for a in SCHEDULE_ALGORITHMS if not ("use_flow_sigmas" in s and a["algorithm_type"] == "dpmsolver")]


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("schedule, algorithm", SCHEDULE_CASES)
def test_sigma_schedules_match_diffusers(schedule, algorithm, steps):
    if algorithm["algorithm_type"] == "dpmsolver" and steps >= 15 and "use_flow_sigmas" not in schedule:
        # these schedules end at sigma_min, the final sigma too: a zero-length last step whose second-order
        # heun weight is 0 / 0 in Diffusers (see the test below); euler_at_final is its working setting
        algorithm = {**algorithm, "euler_at_final": True}
    check(dpm_case({**SD, **schedule, **algorithm}, steps))


@pytest.mark.parametrize("schedule", SCHEDULES[:4], ids=lambda s: next(iter(s)))
def test_zero_length_final_step_stays_finite_where_diffusers_gives_nan(schedule):
    """Deviation: sigma_min-ending schedules with final sigma_min repeat the last sigma; Diffusers' second-order
    heun step computes (exp(h) - 1) / h at h = 0. We take that step at first order (exactly x unchanged), which
    is what Diffusers does with euler_at_final=True, so that run is the oracle."""
    config = {**SD, **schedule, "algorithm_type": "dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"}
    nan_run = run_diffusers(dpm_case(config, 20))
    assert not np.isfinite(nan_run.sample).all(), "Diffusers fixed this: drop the deviation"
    ref = run_diffusers(dpm_case({**config, "euler_at_final": True}, 20))
    got = run_ours(dpm_case(config, 20), DPMSolverMultistepScheduler)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps)
    assert np.max(np.abs(got.sample - ref.sample)) <= 1e-5 * max(1.0, ref.scale)
    np.testing.assert_array_equal(got.trace[-1], got.trace[-2])


def test_dynamic_flow_shift_mu_matches_diffusers():
    config = {"use_flow_sigmas": True, "use_dynamic_shifting": True, "prediction_type": "flow_prediction"}
    check(dpm_case(config, {"num_inference_steps": 12, "mu": 0.8}))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_spacing_and_prediction_types_match_diffusers(prediction_type, spacing, algorithm_type):
    check(dpm_case({**SD, "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": 1,
                    "algorithm_type": algorithm_type}, 12))


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
], ids=["linear", "cosine", "trained_betas"])
def test_beta_schedules_match_diffusers(config):
    check(dpm_case({**config, "solver_order": 3}, 15))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_lambda_min_clipped_cosine_matches_diffusers(spacing):
    """Diffusers' recommended setting for the cosine schedule: timesteps stop where lambda drops below -5.1."""
    ref, _ = check(dpm_case({"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1,
                             "timestep_spacing": spacing}, 10))
    unclipped = diffusers_scheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
    unclipped.set_timesteps(10)
    if spacing != "leading":  # leading's step last // (n + 1) does not notice a clip of 4 timesteps
        assert ref.timesteps[0] < unclipped.timesteps[0], "the clip must actually move the schedule"


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
def test_zero_terminal_snr_matches_diffusers(algorithm_type):
    """From sigma = 4096 the eps-form first step is alpha_t / alpha_s x - sigma_t (e^h - 1) eps with both terms
    ~225x the result: float32 exp(h), correctly rounded in neither torch nor NumPy, differs by an ulp and the
    cancellation lifts that to ~6e-5 of the sample scale, in any float32 implementation. Hence 1e-4 there."""
    rtol = 1e-4 if algorithm_type in ("dpmsolver", "sde-dpmsolver") else 1e-5
    check(dpm_case({**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                    "prediction_type": "v_prediction", "algorithm_type": algorithm_type}, 10), rtol=rtol)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("euler_at_final", [True, False])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_final_step_options_match_diffusers(final_sigmas_type, euler_at_final, lower_order_final, steps):
    check(dpm_case({**SD, "solver_order": 3, "final_sigmas_type": final_sigmas_type,
                    "euler_at_final": euler_at_final, "lower_order_final": lower_order_final}, steps))


@pytest.mark.parametrize("algorithm_type, prediction_type",
                         [("dpmsolver++", "epsilon"), ("dpmsolver++", "v_prediction"), ("dpmsolver", "epsilon"),
                          ("sde-dpmsolver++", "epsilon")])
def test_thresholding_matches_diffusers_and_changes_the_result(algorithm_type, prediction_type):
    config = {"algorithm_type": algorithm_type, "prediction_type": prediction_type, "thresholding": True,
              "sample_max_value": 1.5}
    _, thresholded = check(dpm_case(config, 8))
    plain = run_ours(dpm_case({**config, "thresholding": False}, 8), DPMSolverMultistepScheduler)
    assert np.max(np.abs(plain.sample - thresholded.sample)) > 1e-3


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_learned_range_variance_channels_are_dropped_like_diffusers(algorithm_type):
    # Diffusers keeps the first 3 channels whatever the sample has, so parity holds for 3-channel samples
    check(dpm_case({"variance_type": "learned_range", "algorithm_type": algorithm_type}, 10,
                   model=learned_range_model, shape=(1, 3, 8, 8)))


# -------------------------------------------------------------------------------------- custom schedules, img2img
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("timesteps", [[999, 850, 700, 500, 300, 150, 60, 20], [500]], ids=["8", "1"])
def test_custom_timesteps_match_diffusers(timesteps, algorithm_type):
    check(dpm_case({**SD, "algorithm_type": algorithm_type, "solver_order": 3}, {"timesteps": timesteps}))


def step_ratio_amplification(sigmas: np.ndarray) -> float:
    """max 1 / r over the schedule, r = h_prev / h: the factor by which the backward difference
    D1 = (m0 - m1) / r lifts float32 rounding in m0 - m1 (large when a long step follows a short one)."""
    lambdas = np.array([noise_level(s).lam for s in sigmas[:-1]], dtype=np.float64)
    h = np.diff(lambdas)
    return float(max([1.0, *(h[1:] / h[:-1])]))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.sets(st.integers(0, 999), min_size=1, max_size=12))
def test_any_descending_custom_timesteps_match_diffusers(points):
    """Random schedules include lopsided ones (e.g. 837, 825, 0: a step 92x longer than the one before), where
    the 1e-5 bar is scaled by the amplification beyond 20x; balanced schedules keep 1e-5. Third order takes a
    second difference, so the amplification enters squared (e.g. 849, 848, 601: 1e-5 was exceeded 1.001x)."""
    timesteps = sorted(points, reverse=True)
    scheduler = DPMSolverMultistepScheduler(**SD)
    scheduler.set_timesteps(timesteps=timesteps)
    rtol = 1e-5 * max(1.0, step_ratio_amplification(scheduler.sigmas) ** 2 / 20)
    check(dpm_case({**SD, "solver_order": 3}, {"timesteps": timesteps}), rtol=rtol)


@pytest.mark.parametrize("reference", [{"use_karras_sigmas": True}, {"use_lu_lambdas": True}, {}],
                         ids=["karras", "lu", "default"])
def test_custom_sigmas_reproduce_the_diffusers_schedule_they_came_from(reference):
    """Our extension: a run on custom sigmas equals Diffusers' run on the schedule those sigmas came from."""
    ref = run_diffusers(dpm_case({**SD, **reference, "solver_order": 3}, 12))
    got = run_ours(dpm_case({**SD, "solver_order": 3}, {"sigmas": ref.sigmas}), DPMSolverMultistepScheduler)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps)
    np.testing.assert_array_equal(got.sigmas, ref.sigmas.astype(np.float32))
    assert np.max(np.abs(got.sample - ref.sample)) <= 1e-5 * max(1.0, ref.scale)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_img2img_begin_index_matches_diffusers(algorithm_type):
    check(dpm_case({**SD, "algorithm_type": algorithm_type}, 10, begin_index=4))


def test_add_noise_matches_diffusers_after_set_timesteps():
    ours, ref = DPMSolverMultistepScheduler(**SD), diffusers_scheduler(**SD)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((3, 4, 8, 8), dtype=np.float32), rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    picked = ours.timesteps[[0, 4, 9]]
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(picked)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, picked), expected, rtol=1e-6, atol=1e-6)


def test_add_noise_before_set_timesteps_is_the_forward_process():
    """Before set_timesteps each training timestep gets its own level: sqrt(a_t) x0 + sqrt(1 - a_t) noise, with
    a_t Diffusers' alphas_cumprod (Diffusers' own DPM add_noise pairs timestep t with sigma[999 - t] here)."""
    scheduler = DPMSolverMultistepScheduler(**SD)
    alphas_cumprod = diffusers_scheduler(**SD).alphas_cumprod.double().numpy()
    x0, noise = np.full((2, 1, 2, 2), 0.7, np.float32), np.full((2, 1, 2, 2), -1.3, np.float32)
    t = np.array([10, 900])
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(scheduler.add_noise(x0, noise, t), np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=2e-6)


# ------------------------------------------------------------------------------------------------ SDE specifics
def _sde_loop(ours, ref, steps, draw):
    """Run both schedulers on batch-2 latents, feeding each step's noise source from ``draw(i)``."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    sample = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    x_ref = torch.from_numpy(sample.copy())
    for i, t in enumerate(ours.timesteps):
        ours_kwargs, ref_kwargs = draw(i)
        model = np.tanh(np.float32(0.5) * sample + np.float32(t / 1e4)).astype(np.float32)
        out = ours.step(model, t, sample, **ours_kwargs)
        ref_model = torch.from_numpy(np.tanh(np.float32(0.5) * x_ref.numpy() + np.float32(t / 1e4)).astype(np.float32))
        x_ref = ref.step(ref_model, torch.tensor(t), x_ref, **ref_kwargs).prev_sample
        x0_ref = ref.model_outputs[-1].numpy()  # Diffusers keeps the converted output, x0 for the ++ solvers
        assert np.max(np.abs(out.pred_original_sample - x0_ref)) <= 1e-5 * max(1.0, float(np.max(np.abs(x0_ref))))
        sample = out.prev_sample
    return sample, x_ref.numpy()


def test_sde_with_one_generator_per_batch_row_matches_diffusers():
    ours, ref = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), diffusers_scheduler(
        algorithm_type="sde-dpmsolver++")
    gens = [Generator().manual_seed(11), Generator().manual_seed(12)]
    torch_gens = [torch.Generator("cpu").manual_seed(11), torch.Generator("cpu").manual_seed(12)]
    got, expected = _sde_loop(ours, ref, 8, lambda i: ({"generator": gens}, {"generator": torch_gens}))
    assert np.max(np.abs(got - expected)) <= 1e-5 * max(1.0, float(np.max(np.abs(expected))))


def test_sde_variance_noise_matches_diffusers():
    ours, ref = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3), diffusers_scheduler(
        algorithm_type="sde-dpmsolver++", solver_order=3)
    noises = np.random.default_rng(5).standard_normal((8, 2, 4, 8, 8), dtype=np.float32)
    got, expected = _sde_loop(ours, ref, 8, lambda i: ({"variance_noise": noises[i]},
                                                       {"variance_noise": torch.from_numpy(noises[i])}))
    assert np.max(np.abs(got - expected)) <= 1e-5 * max(1.0, float(np.max(np.abs(expected))))


# ----------------------------------------------------------------------------------------- run state and config
def _full_run(scheduler, sample):
    for t in scheduler.timesteps:
        sample = scheduler.step(np.tanh(sample * np.float32(0.5)), t, sample).prev_sample
    return sample


def test_clones_run_independently_and_share_the_schedule():
    scheduler = DPMSolverMultistepScheduler(**SD, solver_order=3)
    scheduler.set_timesteps(12)
    sample = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    expected = _full_run(scheduler.clone(), sample)
    a, b = scheduler.clone(), scheduler.clone()
    xa, xb = sample, sample
    for t in scheduler.timesteps:  # interleaved: a run must not see the other's history
        xa = a.step(np.tanh(xa * np.float32(0.5)), t, xa).prev_sample
        xb = b.step(np.tanh(xb * np.float32(0.5)), t, xb).prev_sample
    np.testing.assert_array_equal(xa, expected)
    np.testing.assert_array_equal(xb, expected)
    fresh = a.clone()
    assert fresh.step_index is None and fresh.lower_order_nums == 0 and fresh.model_outputs == [None] * 3
    assert fresh.timesteps is scheduler.timesteps and fresh.sigmas is scheduler.sigmas


def test_scale_model_input_is_identity_and_init_noise_sigma_is_one():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(4)
    x = np.ones((1, 4, 2, 2), np.float32)
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x
    assert scheduler.init_noise_sigma == 1.0
    assert scheduler.timesteps.dtype == np.int64


def test_final_step_to_sigma_zero_returns_the_predicted_x0():
    scheduler = DPMSolverMultistepScheduler(**SD)
    scheduler.set_timesteps(5)
    sample = np.random.default_rng(1).standard_normal((1, 4, 4, 4), dtype=np.float32)
    for t in scheduler.timesteps:
        out = scheduler.step(np.tanh(sample), t, sample)
        sample = out.prev_sample
    np.testing.assert_array_equal(out.prev_sample, out.pred_original_sample)


def test_config_schema_and_defaults_equal_diffusers():
    ours, ref = DPMSolverMultistepScheduler().config, diffusers_scheduler().config
    public = {k: v for k, v in ref.items() if not k.startswith("_")}
    assert set(ours) - {"_class_name"} == set(public)
    assert all(ours[k] == v for k, v in public.items())


@pytest.mark.parametrize("source", ["DEISMultistepScheduler", "UniPCMultistepScheduler"])
def test_configs_of_deis_and_unipc_load_like_diffusers(source):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(diffusers, source)().config
        expected = diffusers.DPMSolverMultistepScheduler.from_config(config).config
    ours = DPMSolverMultistepScheduler.from_config(dict(config)).config
    assert (ours.algorithm_type, ours.solver_type) == (expected.algorithm_type, expected.solver_type)


def test_saved_config_loads_back_in_diffrt_and_diffusers(tmp_path):
    scheduler = DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    scheduler.save_config(tmp_path)
    assert DPMSolverMultistepScheduler.from_config(tmp_path).config == scheduler.config
    reference = diffusers.DPMSolverMultistepScheduler
    loaded = reference.from_config(reference.load_config(tmp_path))
    assert all(loaded.config[k] == v for k, v in scheduler.config.items() if not k.startswith("_"))


def test_module_does_not_import_torch():
    code = ("import sys; from diffrt.schedulers.dpm_solver import DPMSolverMultistepScheduler as S; "
            "s = S(algorithm_type='sde-dpmsolver++'); s.set_timesteps(3); "
            "print([m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("config, name", [
    ({"solver_order": 4}, "solver_order"),
    ({"algorithm_type": "dpmsolver+++"}, "algorithm_type"),
    ({"solver_type": "euler"}, "solver_type"),
    ({"prediction_type": "x0"}, "prediction_type"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"variance_type": "fixed"}, "variance_type"),
    ({"algorithm_type": "dpmsolver"}, "final_sigmas_type"),  # final sigma 0 is undefined for the eps form
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3}, "solver_order"),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "flow_prediction"},
     "prediction_type"),
    ({"use_karras_sigmas": True, "use_lu_lambdas": True}, "use_lu_lambdas"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
])
def test_bad_config_raises_value_error_naming_the_parameter(config, name):
    with pytest.raises(ValueError, match=f"`[^`]*{name}[^`]*` must be"):
        DPMSolverMultistepScheduler(**config)


@pytest.mark.parametrize("config, kwargs, name", [
    ({}, {"timesteps": [10, 500, 999]}, "timesteps"),
    ({}, {"timesteps": [999, 999, 10]}, "timesteps"),
    ({}, {"timesteps": [1000, 10]}, "timesteps"),
    ({"use_karras_sigmas": True}, {"timesteps": [999, 500]}, "timesteps"),
    ({}, {"sigmas": [1.0, 5.0, 0.0]}, "sigmas"),
    ({"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {"sigmas": [5.0, 1.0, 0.0]}, "sigmas"),
    ({}, {"num_inference_steps": 0}, "num_inference_steps"),
    ({}, {"num_inference_steps": 10, "mu": 0.5}, "mu"),
])
def test_bad_set_timesteps_raises_value_error_naming_the_parameter(config, kwargs, name):
    scheduler = DPMSolverMultistepScheduler(**config)
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        scheduler.set_timesteps(**kwargs)


def test_step_before_set_timesteps_and_bad_variance_noise_raise():
    scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="`variance_noise` must be"):
        scheduler.step(x, scheduler.timesteps[0], x, variance_noise=np.zeros((1, 4, 3, 3), np.float32))
