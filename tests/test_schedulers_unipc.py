"""UniPCMultistepScheduler: full loops against the installed Diffusers (oracle), custom schedules, run state and
bad input. Tolerance: final samples within 1e-5 of the trajectory's scale (``scheduler_harness.assert_parity``);
timesteps exact."""
from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from scheduler_harness import Case, assert_parity, run_diffusers, run_ours, tanh_model

from diffrt.errors import ConfigError, InputError
from diffrt.schedulers.unipc import UniPCMultistepScheduler, bh_system

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's betas
RTOL = 1e-5


def wide_model(sample: np.ndarray, t: float) -> np.ndarray:
    """The harness stand-in scaled to [-3, 3], so a ``sample`` prediction reaches past dynamic thresholds."""
    return np.float32(3) * tanh_model(sample, t)


def case(config: dict[str, Any] | None = None, steps: int = 10, **kwargs: Any) -> Case:
    return Case("UniPCMultistepScheduler", config or {}, {"num_inference_steps": steps}, **kwargs)


def parity(c: Case) -> None:
    assert_parity(c, ours=UniPCMultistepScheduler, rtol=RTOL)


# ------------------------------------------------------------------------------------------- parity with Diffusers
@pytest.mark.parametrize("steps", [4, 12])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_solver_variants_match_diffusers(solver_order: int, solver_type: str, predict_x0: bool, steps: int) -> None:
    # Diffusers returns NaN at a final sigma of 0 for bh1 and for predict_x0=False, so these end at sigma_min
    # (the zero-final behaviour of bh1 has its own test below)
    final = "zero" if predict_x0 and solver_type == "bh2" else "sigma_min"
    parity(case({**SD, "solver_order": solver_order, "solver_type": solver_type, "predict_x0": predict_x0,
                 "final_sigmas_type": final}, steps))


@pytest.mark.parametrize("steps", [1, 2, 25])
def test_step_counts_match_diffusers(steps: int) -> None:
    parity(case({"solver_order": 3}, steps))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_spacings_and_prediction_types_match_diffusers(spacing: str, prediction_type: str) -> None:
    parity(case({**SD, "timestep_spacing": spacing, "prediction_type": prediction_type, "steps_offset": 1}))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_prediction_form_matches_diffusers_for_each_prediction_type(prediction_type: str) -> None:
    parity(case({**SD, "predict_x0": False, "prediction_type": prediction_type, "final_sigmas_type": "sigma_min"}))


@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_sigma_schedules_match_diffusers(flag: str, final: str, solver_order: int) -> None:
    parity(case({**SD, flag: True, "final_sigmas_type": final, "solver_order": solver_order}, 12))


def test_karras_sigma_range_from_config_matches_diffusers() -> None:
    parity(case({**SD, "use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 20.0}, 8))


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "squaredcos_cap_v2", "solver_order": 3},
    {"trained_betas": np.linspace(1e-4, 2e-2, 1000).tolist()},
    {"num_train_timesteps": 500, "beta_schedule": "linear", "solver_order": 3},
], ids=["linear", "cosine", "trained", "500-train-steps"])
def test_beta_schedules_match_diffusers(config: dict[str, Any]) -> None:
    parity(case(config, 10))


@pytest.mark.parametrize("config", [
    {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {**SD, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "solver_order": 3,
     "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {**SD, "use_karras_sigmas": True, "prediction_type": "v_prediction"},
], ids=["trailing", "bh1-order3", "karras"])
def test_zero_terminal_snr_matches_diffusers(config: dict[str, Any]) -> None:
    parity(case({**config, "rescale_betas_zero_snr": True}, 10))


@pytest.mark.parametrize("config", [
    {"sample_max_value": 1.5},
    {"prediction_type": "sample", "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0},
    {"solver_order": 3, "sample_max_value": 1.2},
], ids=["epsilon", "sample", "order3"])
def test_thresholding_matches_diffusers_and_changes_the_result(config: dict[str, Any]) -> None:
    ref, got = assert_parity(case({**config, "thresholding": True}, model=wide_model), ours=UniPCMultistepScheduler,
                             rtol=RTOL)
    plain = run_ours(case(config, model=wide_model), UniPCMultistepScheduler)
    assert np.abs(plain.sample - got.sample).max() > 1e-2  # the stand-in's x0 does exceed the threshold


@pytest.mark.parametrize("disabled", [[0], [0, 1, 2], [3, 7], list(range(10))])
def test_disable_corrector_matches_diffusers(disabled: list[int]) -> None:
    parity(case({"solver_order": 3, "disable_corrector": disabled}))


@pytest.mark.parametrize("solver_order", [2, 3])
def test_without_lower_order_final_matches_diffusers(solver_order: int) -> None:
    parity(case({**SD, "lower_order_final": False, "solver_order": solver_order, "final_sigmas_type": "sigma_min"},
                8))


def test_fourth_order_matches_diffusers() -> None:
    # beyond the documented 1-3; kept to lower_order_final, since a 4th-order last step from sigma 0.2 to 0.01
    # solves an ill-conditioned float32 Vandermonde system that amplifies ulp differences to ~2e-5 relative
    parity(case({"solver_order": 4}, 25))


@pytest.mark.parametrize("legacy", ["midpoint", "heun", "logrho"])
def test_dpm_solver_type_names_load_as_bh2_like_diffusers(legacy: str) -> None:
    scheduler = UniPCMultistepScheduler(solver_type=legacy)
    assert scheduler.config.solver_type == "bh2"
    parity(case({"solver_type": legacy}))


@pytest.mark.parametrize("begin", [3, 6])
def test_img2img_start_with_set_begin_index_and_add_noise_matches_diffusers(begin: int) -> None:
    parity(case({**SD, "solver_order": 3}, 10, begin_index=begin))


@pytest.mark.parametrize("dtype, rtol", [(np.float64, RTOL), (np.float16, 5e-3)], ids=["float64", "float16"])
def test_sample_dtype_is_kept_and_matches_diffusers_in_that_dtype(dtype: type, rtol: float) -> None:
    """Coefficients are float32 (Diffusers' sigmas are); the run stays in the sample's dtype. float16 agrees to
    a few float16 ulps of the trajectory's scale (Diffusers rounds every torch op to float16)."""
    torch = pytest.importorskip("torch")
    import diffusers

    ref = diffusers.UniPCMultistepScheduler(solver_order=3, **SD)
    ours = UniPCMultistepScheduler(solver_order=3, **SD)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(dtype)
    xt = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        out = ours.step(tanh_model(x, float(t)).astype(dtype), t, x)
        x = out.prev_sample
        xt = ref.step(torch.from_numpy(tanh_model(xt.numpy(), float(t)).astype(dtype)), t, xt).prev_sample
    assert x.dtype == dtype and out.pred_original_sample.dtype == dtype
    reference = xt.numpy().astype(np.float64)
    assert np.abs(x - reference).max() <= rtol * max(1.0, np.abs(reference).max())


# --------------------------------------------------------------------------- beyond Diffusers: bh1 at sigma = 0
def test_bh1_with_zero_final_sigma_returns_the_limit_where_diffusers_gives_nan() -> None:
    """At sigma_t = 0 bh1's B(h) = h = -inf and Diffusers' order-1 step adds -inf * 0 = NaN; the exact step is
    the data prediction m0. Oracle: Diffusers' own trajectory up to the last step and its own x0 there."""
    torch = pytest.importorskip("torch")
    import diffusers

    config = {**SD, "solver_type": "bh1", "solver_order": 2}
    ref = diffusers.UniPCMultistepScheduler(**config)
    ref.set_timesteps(6)
    sample = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32))
    trace = []
    for t in ref.timesteps:
        sample = ref.step(torch.from_numpy(tanh_model(sample.numpy(), float(t))), t, sample).prev_sample
        trace.append(sample.numpy())
    assert np.isnan(trace[-1]).all()  # the Diffusers behaviour this test is about
    expected = ref.model_outputs[-1].numpy()  # Diffusers' data prediction at the last step

    ours = UniPCMultistepScheduler(**config)
    ours.set_timesteps(6)
    x = np.random.default_rng(3).standard_normal((1, 4, 8, 8), dtype=np.float32)
    for k, t in enumerate(ours.timesteps):
        out = ours.step(tanh_model(x, float(t)), t, x)
        x = out.prev_sample
        if k < len(trace) - 1:
            assert np.abs(x - trace[k]).max() <= RTOL * max(1.0, np.abs(trace[k]).max())
    np.testing.assert_allclose(x, expected, rtol=0, atol=RTOL * max(1.0, np.abs(expected).max()))
    np.testing.assert_array_equal(x, out.pred_original_sample)


# ------------------------------------------------------------------------------- custom timesteps and sigmas
def _diffusers_loop(config: dict[str, Any], timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Diffusers' UniPC stepping over a schedule we hand it (its set_timesteps cannot build custom ones)."""
    import diffusers
    import torch

    scheduler = diffusers.UniPCMultistepScheduler(**config)
    scheduler.set_timesteps(len(timesteps))
    scheduler.timesteps = torch.from_numpy(np.array(timesteps, dtype=np.int64))
    scheduler.sigmas = torch.from_numpy(np.array(sigmas, dtype=np.float32))
    sample = torch.from_numpy(_noise())
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.from_numpy(tanh_model(sample.numpy(), float(t))), t, sample).prev_sample
    return sample.numpy()


def _our_loop(scheduler: UniPCMultistepScheduler) -> np.ndarray:
    sample = _noise()
    for t in scheduler.timesteps:
        sample = scheduler.step(tanh_model(sample, float(t)), t, sample).prev_sample
    return sample


def _noise() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, 8, 8), dtype=np.float32)


def _assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.isfinite(ref).all()
    assert np.abs(got - ref).max() <= RTOL * max(1.0, np.abs(ref).max())


AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, SD 1.5 (Sabour et al. 2024)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_custom_timesteps_schedule_matches_diffusers_dpm_solver_and_loop(final: str) -> None:
    """Diffusers' DPM-Solver builds custom-timestep schedules (interpolated training sigmas + final sigma);
    ours must equal it, and Diffusers' UniPC stepping over that schedule must equal our run."""
    import diffusers

    config = {**SD, "final_sigmas_type": final, "solver_order": 3}
    dpm = diffusers.DPMSolverMultistepScheduler(**config)
    dpm.set_timesteps(timesteps=AYS_SD15)
    ours = UniPCMultistepScheduler(**config)
    ours.set_timesteps(timesteps=AYS_SD15)
    np.testing.assert_array_equal(ours.timesteps, dpm.timesteps.numpy())
    np.testing.assert_allclose(ours.sigmas, dpm.sigmas.numpy(), rtol=1e-6)
    assert ours.timesteps.dtype == np.int64 and ours.num_inference_steps == len(AYS_SD15)
    _assert_close(_our_loop(ours), _diffusers_loop(config, dpm.timesteps.numpy(), dpm.sigmas.numpy()))


def test_custom_timesteps_equal_to_a_spacing_reproduce_that_run() -> None:
    ref = run_diffusers(case(SD, 9))
    ours = UniPCMultistepScheduler(**SD)
    ours.set_timesteps(timesteps=ref.timesteps.tolist())
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas, rtol=1e-6)


def test_custom_sigmas_map_to_rounded_timesteps_and_match_diffusers_stepping() -> None:
    """Custom sigmas (n + 1 values, the last the final one): timesteps by sigma->t on the training log-sigmas,
    rounded as Diffusers rounds Karras timesteps. Oracle: Diffusers' Euler maps custom sigmas to (unrounded)
    timesteps the same way; Diffusers' UniPC steps over the schedule."""
    import diffusers

    sigmas = [14.6, 6.0, 2.9, 1.5, 0.8, 0.4, 0.15, 0.03, 0.0]
    euler = diffusers.EulerDiscreteScheduler(**SD)
    euler.set_timesteps(sigmas=sigmas)
    ours = UniPCMultistepScheduler(**SD, solver_order=3)
    ours.set_timesteps(sigmas=sigmas)
    np.testing.assert_array_equal(ours.timesteps, np.round(euler.timesteps.numpy()).astype(np.int64))
    np.testing.assert_array_equal(ours.sigmas, np.asarray(sigmas, dtype=np.float32))
    assert ours.num_inference_steps == len(sigmas) - 1
    _assert_close(_our_loop(ours), _diffusers_loop({**SD, "solver_order": 3}, ours.timesteps, ours.sigmas))


def test_custom_sigmas_equal_to_karras_reproduce_the_karras_run() -> None:
    config = {**SD, "use_karras_sigmas": True, "solver_order": 3}
    ref = run_diffusers(case(config, 10))
    ours = UniPCMultistepScheduler(**SD, solver_order=3)
    ours.set_timesteps(sigmas=ref.sigmas)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps)
    _assert_close(_our_loop(ours), _diffusers_loop(config, ref.timesteps, ref.sigmas))


# ------------------------------------------------------------------------------------- add_noise, state, config
def test_add_noise_matches_diffusers_at_looked_up_timesteps() -> None:
    torch = pytest.importorskip("torch")
    import diffusers

    ref = diffusers.UniPCMultistepScheduler(**SD)
    ours = UniPCMultistepScheduler(**SD)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    rng = np.random.default_rng(5)
    x0, noise = (rng.standard_normal((3, 4, 8, 8), dtype=np.float32) for _ in range(2))
    timesteps = ours.timesteps[[0, 4, 9]]
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps)).numpy()
    got = ours.add_noise(x0, noise, timesteps)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_add_noise_before_set_timesteps_is_the_forward_process_of_each_timestep() -> None:
    """Training-style use: every training timestep has its own noise level. Oracle: Diffusers' DDPM add_noise,
    sqrt(a_t) x0 + sqrt(1 - a_t) noise (Diffusers' UniPC pairs descending timesteps with ascending sigmas here)."""
    torch = pytest.importorskip("torch")
    import diffusers

    ddpm = diffusers.DDPMScheduler(**SD)
    ours = UniPCMultistepScheduler(**SD)
    rng = np.random.default_rng(6)
    x0, noise = (rng.standard_normal((4, 4, 8, 8), dtype=np.float32) for _ in range(2))
    timesteps = np.array([999, 700, 250, 3])
    expected = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, timesteps), expected, rtol=1e-5, atol=1e-5)


def test_clones_run_interleaved_like_separate_runs() -> None:
    """One pipeline serves concurrent calls through clones: two interleaved runs equal two sequential ones."""
    base = UniPCMultistepScheduler(**SD, solver_order=3)
    base.set_timesteps(8)
    expected = _our_loop(base.clone())
    a, b = base.clone(), base.clone()
    xa = xb = _noise()
    for t in base.timesteps:
        xa = a.step(tanh_model(xa, float(t)), t, xa).prev_sample
        xb = b.step(tanh_model(xb, float(t)), t, xb).prev_sample
    np.testing.assert_array_equal(xa, expected)
    np.testing.assert_array_equal(xb, expected)
    assert base.step_index is None and base.model_outputs == []  # the clones left the original untouched
    np.testing.assert_array_equal(a.timesteps, base.timesteps)


def test_clone_mid_run_starts_fresh_and_leaves_the_run_going() -> None:
    def fresh_scheduler() -> UniPCMultistepScheduler:
        scheduler = UniPCMultistepScheduler(**SD, solver_order=3)
        scheduler.set_timesteps(6)
        return scheduler

    uninterrupted = _our_loop(fresh_scheduler())
    scheduler = fresh_scheduler()
    x = _noise()
    for t in scheduler.timesteps[:3]:
        x = scheduler.step(tanh_model(x, float(t)), t, x).prev_sample
    clone = scheduler.clone()
    assert clone.step_index is None and clone.last_sample is None and clone.lower_order_nums == 0
    np.testing.assert_array_equal(_our_loop(clone), uninterrupted)
    for t in scheduler.timesteps[3:]:
        x = scheduler.step(tanh_model(x, float(t)), t, x).prev_sample
    np.testing.assert_array_equal(x, uninterrupted)
    scheduler.set_timesteps(6)
    assert scheduler.step_index is None and scheduler.model_outputs == []


def test_step_returns_x0_prediction_and_tuple_form() -> None:
    scheduler = UniPCMultistepScheduler(**SD, prediction_type="sample")
    scheduler.set_timesteps(4)
    x, t = _noise(), scheduler.timesteps[0]
    model_output = tanh_model(x, float(t))
    prev, x0 = scheduler.clone().step(model_output, t, x, return_dict=False)
    out = scheduler.step(model_output, t, x)
    np.testing.assert_array_equal(x0, model_output)  # sample prediction: x0 is the model output itself
    np.testing.assert_array_equal(prev, out.prev_sample)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.scale_model_input(x, t) is x


def test_config_round_trips_with_diffusers(tmp_path: Any) -> None:
    import diffusers

    ours = UniPCMultistepScheduler(**SD, solver_order=3, disable_corrector=[0, 1], timestep_spacing="trailing")
    ours.save_config(tmp_path)
    theirs = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    back = UniPCMultistepScheduler.from_config(dict(theirs.config))
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == {
        k: v for k, v in UniPCMultistepScheduler.from_config(tmp_path).config.items() if not k.startswith("_")}
    expected_keys = set(diffusers.UniPCMultistepScheduler.from_config({}).config) - {"_use_default_values"}
    assert set(ours.config) - {"_class_name"} == {k for k in expected_keys if not k.startswith("_")}
    assert back.config.disable_corrector == [0, 1] and back.config.solver_order == 3


def test_compatible_schedulers_load_its_config_and_it_loads_theirs() -> None:
    ours = UniPCMultistepScheduler(**SD, solver_order=3)
    classes = ours.compatibles
    assert "EulerDiscreteScheduler" in {cls.__name__ for cls in classes}
    for cls in classes:
        other = cls.from_config(ours.config)
        assert other.config.beta_schedule == "scaled_linear" and other.config.beta_end == 0.012
        back = UniPCMultistepScheduler.from_config(other.config)
        assert back.config.beta_schedule == "scaled_linear"


# ---------------------------------------------------------------------------------------------------- the math
def _phi(k: int, z: float) -> float:
    """phi_k(z) = sum_j z^j / (j + k)!, the exponential-integrator functions, in float64 by series."""
    return sum(z**j / math.factorial(j + k) for j in range(40))


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_order_conditions_follow_the_paper_in_float32(solver_type: str, predict_x0: bool) -> None:
    """b_i = i! hh phi_(i+1)(hh) / B(hh) with hh = -h for x0 prediction (Zhao et al. 2023, Theorem 3.1)."""
    h = np.float32(0.6)
    rks = np.array([-0.8, -1.9, 1.0], dtype=np.float32)
    h_phi_1, b_h, r_matrix, b = bh_system(h, rks, 3, predict_x0, solver_type)
    hh = -0.6 if predict_x0 else 0.6
    big_b = hh if solver_type == "bh1" else math.expm1(hh)
    expected_b = [math.factorial(i) * hh * _phi(i + 1, hh) / big_b for i in range(1, 4)]
    assert b.dtype == np.float32 and r_matrix.dtype == np.float32
    # Diffusers' recurrence phi_(k+1) = (phi_k - 1/k!) / h cancels in float32: ~1e-5 relative by k = 4
    np.testing.assert_allclose(b, expected_b, rtol=1e-4)
    np.testing.assert_allclose(h_phi_1, math.expm1(hh), rtol=1e-6)
    np.testing.assert_allclose(b_h, big_b, rtol=1e-6)
    np.testing.assert_allclose(r_matrix, np.stack([rks**0, rks, rks**2]), rtol=0)
    rhos = np.linalg.solve(r_matrix, b)
    assert rhos.dtype == np.float32  # solved in float32, as Diffusers' torch.linalg.solve on float32
    np.testing.assert_allclose(r_matrix.astype(np.float64) @ rhos, expected_b, rtol=1e-4)


def test_module_imports_without_torch() -> None:
    code = ("import sys; import diffrt.schedulers.unipc; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or result.stdout


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("config, name", [
    ({"solver_order": 0}, "solver_order"),
    ({"solver_order": 2.5}, "solver_order"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"prediction_type": "eps"}, "prediction_type"),
    ({"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"beta_schedule": "cosine"}, "beta_schedule"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"solver_p": "EulerDiscreteScheduler"}, "solver_p"),
    ({"disable_corrector": "0,1"}, "disable_corrector"),
    ({"disable_corrector": [0.5]}, "disable_corrector"),
    ({"disable_corrector": None}, "disable_corrector"),
    ({"predict_x0": False}, "final_sigmas_type"),  # Diffusers: NaN at the final sigma = 0
    ({"lower_order_final": False}, "lower_order_final"),  # Diffusers: Inf at the final sigma = 0
])
def test_bad_config_raises_config_error_naming_the_key(config: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=f"`{name}"):
        UniPCMultistepScheduler(**config)


def test_singular_final_step_raises_before_running() -> None:
    """Karras + sigma_min repeats the last sigma: h = 0 and order-3 conditions are singular (Diffusers raises
    LinAlgError at the last step); we refuse the schedule in set_timesteps."""
    scheduler = UniPCMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min", solver_order=3,
                                        lower_order_final=False)
    with pytest.raises(ConfigError, match="`lower_order_final`"):
        scheduler.set_timesteps(10)


@pytest.mark.parametrize("config, kwargs, name", [
    ({}, {"num_inference_steps": 0}, "num_inference_steps"),
    ({}, {"num_inference_steps": 5, "timesteps": [10, 5]}, "num_inference_steps"),
    ({}, {}, "num_inference_steps"),
    ({}, {"timesteps": [5, 10]}, "timesteps"),
    ({}, {"timesteps": [1000, 10]}, "timesteps"),
    ({}, {"timesteps": [900.5, 10]}, "timesteps"),
    ({"use_karras_sigmas": True}, {"timesteps": [900, 10]}, "timesteps"),
    ({}, {"sigmas": [1.0, 2.0, 0.0]}, "sigmas"),
    ({"predict_x0": False, "final_sigmas_type": "sigma_min"}, {"sigmas": [3.0, 1.0, 0.0]}, "sigmas"),
])
def test_bad_set_timesteps_raises_naming_the_parameter(config: dict, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}"):
        UniPCMultistepScheduler(**config).set_timesteps(**kwargs)


def test_bad_step_input_raises_naming_the_problem() -> None:
    scheduler = UniPCMultistepScheduler()
    x = _noise()
    with pytest.raises(InputError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(5)
    with pytest.raises(InputError, match="`timestep`"):
        scheduler.step(x, 998, x)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="`model_output`.*step 0"):
        scheduler.step(bad, scheduler.timesteps[0], x)
    with pytest.raises(InputError, match="`begin_index`"):
        scheduler.set_begin_index(-1)
