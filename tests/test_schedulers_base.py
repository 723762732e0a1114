"""The shared scheduler machinery: tables vs Diffusers/torch, config handling, registry, clone, validation, AYS."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

import diffrt.schedulers as schedulers
from diffrt.errors import ConfigError, InputError
from diffrt.schedulers import base
from diffrt.schedulers.ays import AysSchedules, ays_schedule, loglinear_interp
from diffrt.schedulers.euler import EulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[1]
ALL = schedulers.registered_names()
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


# ------------------------------------------------------------------------------------------------ numeric tables
@pytest.mark.parametrize("steps", [1, 2, 15, 16, 17, 1000, 4097])
@pytest.mark.parametrize("ends", [(0.0001, 0.02), (0.00085**0.5, 0.012**0.5), (-6.0, 6.0), (1.0, -3.5)])
def test_torch_linspace_f32_is_bit_exact(steps: int, ends: tuple[float, float]) -> None:
    expected = torch.linspace(*ends, steps, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(base.torch_linspace_f32(*ends, steps), expected)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "exp", "laplace"])
def test_betas_and_alphas_cumprod_are_bit_exact(schedule: str) -> None:
    cls = diffusers.HeunDiscreteScheduler if schedule == "exp" else diffusers.DDPMScheduler
    ref = cls(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    cfg = {"num_train_timesteps": 1000, "beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012}
    betas, _, alphas_cumprod = base.alphas_cumprod_from_config(cfg, (schedule,))
    np.testing.assert_array_equal(betas, ref.betas.numpy())
    np.testing.assert_array_equal(alphas_cumprod, ref.alphas_cumprod.numpy())


def test_sigmoid_betas_match_diffusers_to_float32_rounding() -> None:
    ref = diffusers.DDPMScheduler(beta_schedule="sigmoid").betas.numpy()
    betas = base.make_betas("sigmoid", 0.0001, 0.02, 1000)
    np.testing.assert_allclose(betas, ref, rtol=2e-6)  # torch's vectorised exp is not NumPy's: last-ulp only


def test_trained_betas_are_used_verbatim() -> None:
    trained = np.linspace(0.001, 0.01, 50)
    ours = EulerDiscreteScheduler(num_train_timesteps=50, trained_betas=trained.tolist())
    ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=50, trained_betas=trained.tolist())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


def test_rescale_zero_terminal_snr_matches_diffusers() -> None:
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = base.make_betas("scaled_linear", 0.00085, 0.012, 1000)
    ours = base.rescale_zero_terminal_snr(betas)
    ref = rescale_zero_terminal_snr(torch.from_numpy(betas.copy())).numpy()
    # torch's float32 sqrt (MKL VML) is not correctly rounded; everything else in the path is bit-exact
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-6)
    assert ours[-1] == 1.0 and np.all(np.diff(np.cumprod(1 - ours.astype(np.float64))) <= 0)


def test_training_sigmas_match_diffusers_within_an_ulp() -> None:
    ours = EulerDiscreteScheduler(**SD)
    ref = diffusers.EulerDiscreteScheduler(**SD)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1.2e-7)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


@pytest.mark.parametrize("kind", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_sigma_schedules_match_diffusers(kind: str, steps: int) -> None:
    ref = diffusers.EulerDiscreteScheduler(**SD)
    in_sigmas = np.array([14.6146, 3.2, 0.0292])
    expected = getattr(ref, f"_convert_to_{kind}")(torch.from_numpy(in_sigmas), steps)
    ours = getattr(base, f"{kind}_sigmas")(0.0292, 14.6146, steps)
    np.testing.assert_allclose(ours, np.asarray(expected), rtol=1e-13)


def test_betaincinv_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7)]:
        for q in np.linspace(0, 1, 101):
            assert base.betaincinv(a, b, q) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-12, abs=1e-15)


def test_sigma_to_t_matches_diffusers_exactly() -> None:
    ref = diffusers.EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))
    for sigmas in (base.karras_sigmas(0.03, 14.6, 25), np.array([14.615, 6.475, 0.152], dtype=np.float32)):
        expected = np.array([ref._sigma_to_t(s, log_sigmas) for s in sigmas])
        np.testing.assert_array_equal(base.sigma_to_t(sigmas, log_sigmas), expected)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 7, 50, 1000])
def test_integer_spacing_matches_diffusers(spacing: str, steps: int) -> None:
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(steps)
    ours = schedulers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype == np.int64


def test_dynamic_threshold_matches_diffusers() -> None:
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32) * 3
    expected = ref._threshold_sample(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(base.dynamic_threshold(x, 0.9, 2.0), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------ config
def test_config_is_read_only_dict_with_attribute_access() -> None:
    s = EulerDiscreteScheduler(**SD)
    assert s.config.beta_schedule == "scaled_linear" and s.config["_class_name"] == "EulerDiscreteScheduler"
    assert isinstance(s.config, dict)
    with pytest.raises(TypeError):
        s.config["beta_schedule"] = "linear"
    with pytest.raises(TypeError):
        s.config.beta_schedule = "linear"
    with pytest.raises(AttributeError):
        _ = s.config.no_such_key


def test_config_schema_is_the_diffusers_constructor() -> None:
    for name in ALL:
        ours = set(schedulers.get_scheduler_class(name)().config) - {"_class_name"}
        ref = set(getattr(diffusers, name)().config) - {"_class_name", "_diffusers_version", "_use_default_values"}
        assert ours == ref, name
        defaults = getattr(diffusers, name)().config
        for key in ours:
            assert _jsonable(schedulers.get_scheduler_class(name)().config[key]) == _jsonable(defaults[key]), key


def _jsonable(value: object) -> object:
    return json.loads(json.dumps(value, default=lambda v: np.asarray(v).tolist()))


def test_save_config_round_trips_and_diffusers_reads_it(tmp_path: Path) -> None:
    s = EulerDiscreteScheduler(**SD, prediction_type="v_prediction", trained_betas=None, steps_offset=1)
    path = s.save_config(tmp_path / "sched")
    assert path.name == "scheduler_config.json" and os.listdir(path.parent) == ["scheduler_config.json"]
    again = EulerDiscreteScheduler.from_config(path.parent)
    assert dict(again.config) == dict(s.config)
    ref = diffusers.EulerDiscreteScheduler.from_pretrained(path.parent)
    for key, value in s.config.items():
        if not key.startswith("_"):
            assert ref.config[key] == value, key


def test_from_config_accepts_dicts_schedulers_files_folders_and_model_folders(tmp_path: Path) -> None:
    ref = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    ref.save_config(tmp_path / "model" / "scheduler")
    sources = [ref.config, dict(ref.config), ref, tmp_path / "model" / "scheduler" / "scheduler_config.json",
               tmp_path / "model" / "scheduler", str(tmp_path / "model")]
    for source in sources:
        s = EulerDiscreteScheduler.from_config(source)
        assert s.config.timestep_spacing == "trailing" and s.config.beta_schedule == "scaled_linear"
    assert "_diffusers_version" in EulerDiscreteScheduler.from_config(ref.config).config


def test_schedulers_pickle_with_their_config() -> None:
    import pickle

    s = EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    s.set_timesteps(5)
    again = pickle.loads(pickle.dumps(s))
    assert dict(again.config) == dict(s.config) and isinstance(again.config, base.FrozenConfig)
    np.testing.assert_array_equal(again.sigmas, s.sigmas)


def test_from_config_overrides_and_use_default_values() -> None:
    cfg = {**SD, "prediction_type": "v_prediction", "_use_default_values": ["prediction_type"]}
    s = EulerDiscreteScheduler.from_config(cfg, timestep_spacing="trailing")
    assert s.config.prediction_type == "epsilon" and s.config.timestep_spacing == "trailing"


def test_unknown_keys_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diffrt.schedulers.base"):
        s = EulerDiscreteScheduler.from_config({**SD, "not_a_key": 1}, also_not=2)
    assert "not_a_key" in caplog.text and "also_not" in caplog.text and "also_not" not in s.config
    # Diffusers keeps unconsumed config keys as "hidden" ones (for compatible classes); overrides it drops.
    ref = diffusers.EulerDiscreteScheduler.from_config({**SD, "not_a_key": 1}, also_not=2)
    assert ("not_a_key" in s.config) == ("not_a_key" in ref.config)


def test_keys_of_another_scheduler_class_are_ignored_quietly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="diffrt.schedulers.base"):
        s = EulerDiscreteScheduler.from_config(diffusers.DDIMScheduler(**SD).config)
    assert caplog.text == "" and "clip_sample" not in s.config
    assert s.config["_class_name"] == "EulerDiscreteScheduler"
    with caplog.at_level(logging.WARNING, logger="diffrt.schedulers.base"):  # a class diffrt lacks: keys unknown
        EulerDiscreteScheduler.from_config({**diffusers.ScoreSdeVeScheduler().config,
                                            "_class_name": "ScoreSdeVeScheduler"})
    assert caplog.text == ""


# ----------------------------------------------------------------------------------------------------- registry
def test_registry_exports_every_class_by_its_diffusers_name() -> None:
    for name in ALL:
        cls = getattr(schedulers, name)
        assert cls.__name__ == name and schedulers.get_scheduler_class(name) is cls
        assert hasattr(diffusers, name)
    assert {"SchedulerOutput", "AysSchedules", "ays_schedule", "from_config"} <= set(dir(schedulers))


def test_module_from_config_dispatches_on_class_name(tmp_path: Path) -> None:
    diffusers.DDIMScheduler(**SD).save_config(tmp_path)
    s = schedulers.from_config(tmp_path, prediction_type="v_prediction")
    assert type(s).__name__ == "DDIMScheduler" and s.config.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="`class_name`.*ScoreSdeVeScheduler"):
        schedulers.from_config(diffusers.ScoreSdeVeScheduler())
    assert type(schedulers.from_config(diffusers.EulerDiscreteScheduler())).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ConfigError, match="`_class_name`"):
        schedulers.from_config(dict(SD))


def test_compatibles_mirror_diffusers_by_name() -> None:
    for name in ALL:
        ours = {c.__name__ for c in schedulers.get_scheduler_class(name)().compatibles}
        ref = {c.__name__ for c in getattr(diffusers, name)().compatibles}
        assert ours == ref & set(ALL), name


def test_import_stays_torch_free() -> None:
    code = ("import sys, numpy as np, diffrt.schedulers as s\n"
            "for n in s.registered_names():\n"
            "    x = s.get_scheduler_class(n)(); x.set_timesteps(4)\n"
            "s.ays_schedule('StableDiffusionXL', 12)\n"
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---------------------------------------------------------------------------------------------- clone and state
@pytest.mark.parametrize("name", ALL)
def test_clone_shares_tables_and_runs_independently(name: str) -> None:
    s = schedulers.get_scheduler_class(name)()
    s.set_timesteps(4)
    c = s.clone()
    table = "alphas_cumprod" if hasattr(s, "alphas_cumprod") else "sigmas"  # EDM / flow matching have no betas
    assert np.shares_memory(getattr(c, table), getattr(s, table)) and c.timesteps is s.timesteps
    with pytest.raises(ValueError):
        getattr(c, table)[0] = 0.5  # shared tables are read-only
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    runs = []
    for sched in (s, c, s.clone()):
        sample = x.copy()
        gen = np.random.default_rng(7)
        for t in sched.timesteps:
            out = np.tanh(sched.scale_model_input(sample, t))
            kwargs = {"generator": gen} if "generator" in sched.step.__code__.co_varnames else {}
            sample = sched.step(out, t, sample, **kwargs).prev_sample
        runs.append(sample)
    assert s.step_index is not None and s.clone().step_index is None
    assert all(r.dtype == np.float32 for r in runs)  # no float64 promotion on the way
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": -3}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"num_inference_steps": True}, "num_inference_steps"),
        ({"num_inference_steps": 4, "timesteps": [999, 500]}, "timesteps"),
        ({"timesteps": []}, "timesteps"),
        ({"timesteps": [500, 999]}, "timesteps"),
        ({"timesteps": [999, 999, 500]}, "timesteps"),
        ({"timesteps": [1000, 500]}, "timesteps"),
        ({"timesteps": [999, -1]}, "timesteps"),
        ({"sigmas": [14.6]}, "sigmas"),
        ({"sigmas": [1.0, 14.6, 0.0]}, "sigmas"),
        ({"sigmas": [14.6, 1.0, -0.5]}, "sigmas"),
        ({"sigmas": [14.6, float("nan"), 0.0]}, "sigmas"),
    ],
)
def test_set_timesteps_rejects_bad_arguments_naming_them(name: str, kwargs: dict, param: str) -> None:
    if name.endswith("InverseScheduler") and kwargs.get("timesteps") == [500, 999]:
        kwargs = {"timesteps": [999, 500]}  # inversion runs from clean to noisy: ascending is the valid order
    if name == "FlowMatchEulerDiscreteScheduler" and kwargs.get("timesteps") == [1000, 500]:
        pytest.skip("flow matching's timesteps live in (0, num_train_timesteps]: 1000 is valid")
    s = schedulers.get_scheduler_class(name)()
    with pytest.raises(InputError, match=f"`{param}`"):
        s.set_timesteps(**kwargs)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "key, value",
    [("beta_schedule", "cubic"), ("timestep_spacing", "even"), ("prediction_type", "noise")],
)
def test_unknown_config_values_raise_naming_the_key(name: str, key: str, value: str) -> None:
    cls = schedulers.get_scheduler_class(name)
    if key not in base.init_keys(cls):
        pytest.skip(f"{name} has no `{key}` (as in Diffusers)")
    with pytest.raises(ConfigError, match=f"`{key}` must be one of .*'{value}'"):
        cls(**{key: value})


def test_scheduler_specific_config_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="`use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas`"):
        EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ConfigError, match="`final_sigmas_type`"):
        EulerDiscreteScheduler(final_sigmas_type="one")
    with pytest.raises(ConfigError, match="`interpolation_type`"):
        EulerDiscreteScheduler(interpolation_type="cubic")
    with pytest.raises(ConfigError, match="`variance_type`"):
        schedulers.DDPMScheduler(variance_type="huge")
    with pytest.raises(InputError, match="`timesteps`.*use_karras_sigmas"):
        EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500])
    with pytest.raises(InputError, match="`num_inference_steps`.*<= 1000"):
        schedulers.DDIMScheduler().set_timesteps(1001)
    with pytest.raises(InputError, match="`num_inference_steps`"):
        schedulers.LCMScheduler().set_timesteps(51)
    with pytest.raises(InputError, match="`original_inference_steps`"):
        schedulers.LCMScheduler().set_timesteps(4, original_inference_steps=2000)
    with pytest.raises(InputError, match="`timesteps`.*integers"):
        schedulers.DDIMScheduler().set_timesteps(timesteps=[999.5, 500])


@pytest.mark.parametrize("name", ALL)
def test_nan_model_output_raises_with_the_step_index(name: str) -> None:
    s = schedulers.get_scheduler_class(name)()
    s.set_timesteps(4)
    x = np.zeros((1, 4, 8, 8), np.float32)
    t0, t1 = s.timesteps[0], s.timesteps[1]
    x = s.step(np.zeros_like(x), t0, x, generator=np.random.default_rng(0)).prev_sample if "generator" in \
        s.step.__code__.co_varnames else s.step(np.zeros_like(x), t0, x).prev_sample
    bad = np.zeros_like(x)
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"`model_output` must be finite; got 1 NaN/Inf values at step 1"):
        s.step(bad, t1, x)


def test_step_needs_a_schedule_and_a_scheduled_timestep() -> None:
    s = EulerDiscreteScheduler()
    x = np.zeros((1, 4, 8, 8), np.float32)
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 999.0, x)
    s.set_timesteps(4)
    with pytest.raises(InputError, match="`timestep` must be one of the scheduler's timesteps"):
        s.step(x, 998.5, x)
    with pytest.raises(InputError, match="`timestep`.*integer index"):
        s.step(x, 0, x)
    with pytest.raises(InputError, match="`begin_index`"):
        s.set_begin_index(-1)


def test_from_config_rejects_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`config`"):
        EulerDiscreteScheduler.from_config(tmp_path / "nowhere")
    with pytest.raises(InputError, match="`config`"):
        EulerDiscreteScheduler.from_config(42)


# ----------------------------------------------------------------------------------------------------------- AYS
def test_ays_lists_equal_diffusers() -> None:
    from diffusers.schedulers.scheduling_utils import AysSchedules as reference

    assert AysSchedules == reference


@pytest.mark.parametrize("model", ["StableDiffusion", "StableDiffusionXL", "StableDiffusionVideo"])
def test_ays_schedule_at_ten_steps_is_the_published_list(model: str) -> None:
    schedule = ays_schedule(model, 10)
    assert schedule.sigmas.tolist() == AysSchedules[f"{model}Sigmas"]
    if model == "StableDiffusionVideo":
        assert schedule.timesteps is None
    else:
        assert schedule.timesteps.tolist() == AysSchedules[f"{model}Timesteps"]


@pytest.mark.parametrize("model", ["StableDiffusion", "StableDiffusionXL"])
def test_ays_timesteps_are_the_sigma_table_map_of_the_sigmas(model: str) -> None:
    """The published timesteps are the SD training table's sigma -> t map of the published sigmas, within one
    step (the sigmas are printed to 3 decimals): the rule we use for other step counts."""
    table = EulerDiscreteScheduler(**SD)
    sigmas = np.array(AysSchedules[f"{model}Sigmas"][:-1])
    mapped = base.sigma_to_t(sigmas, table.log_sigmas)
    np.testing.assert_allclose(mapped, AysSchedules[f"{model}Timesteps"], atol=0.65)


@pytest.mark.parametrize("steps", [1, 2, 4, 19, 25, 40])
def test_ays_interpolation_is_log_linear_and_keeps_the_ends(steps: int) -> None:
    published = np.array(AysSchedules["StableDiffusionXLSigmas"])
    schedule = ays_schedule("StableDiffusionXL", steps)
    sigmas, timesteps = schedule.sigmas, schedule.timesteps
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0 and sigmas[0] == published[0]
    assert np.all(np.diff(sigmas) < 0) and len(timesteps) == steps and np.all(np.diff(timesteps) < 0)
    if steps > 1:
        assert sigmas[-2] == published[-2]
        knots = np.log(published[:-1][::-1])  # ascending, as the AYS code interpolates
        for j, sigma in enumerate(sigmas[:-1][::-1]):
            x = j / (steps - 1) * (len(knots) - 1)
            k = min(int(x), len(knots) - 2)
            assert np.log(sigma) == pytest.approx((k + 1 - x) * knots[k] + (x - k) * knots[k + 1], abs=1e-12)
    if steps == 19:  # every other point of a 19-point resampling of 10 points is an original point
        np.testing.assert_allclose(sigmas[:-1:2], published[:-1], rtol=1e-12)
    np.testing.assert_allclose(loglinear_interp(published[:-1], 10), published[:-1], rtol=1e-12)


def test_ays_schedule_drives_euler_like_the_published_lists() -> None:
    ours = EulerDiscreteScheduler(**SD)
    ours.set_timesteps(sigmas=ays_schedule("StableDiffusionXL", 10).sigmas)
    ref = diffusers.EulerDiscreteScheduler(**SD)
    ref.set_timesteps(sigmas=AysSchedules["StableDiffusionXLSigmas"])
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-7)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6)


def test_ays_rejects_unknown_models_and_bad_counts() -> None:
    with pytest.raises(InputError, match="`model` must be one of"):
        ays_schedule("SD3", 10)
    with pytest.raises(InputError, match="`num_inference_steps`"):
        ays_schedule("StableDiffusion", 0)


def test_example_script_runs_torch_free_and_checks_itself() -> None:
    code = ("import runpy, sys\n"
            "sys.argv = ['scheduler_example.py']\n"
            "try:\n"
            "    runpy.run_path('scripts/scheduler_example.py', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "self-check" in out and "OK" in out and "[999, 845, 730, 587, 443, 310, 193, 116, 53, 13]" in out
