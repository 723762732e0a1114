"""A1111 / ComfyUI sampler names -> schedulers, as the Diffusers scheduler docs map them.

The expected table below is transcribed from Diffusers' docs (api/schedulers/overview.md, "A1111/k-diffusion" and
"Noise schedules and schedule types"), with one documented departure: "DPM++ SDE" is DPMSolverSDEScheduler (the
port of k-diffusion's sample_dpmpp_sde that A1111 runs), where the table says DPMSolverSinglestepScheduler.
Each built scheduler is checked against Diffusers' class built from the same config with the same settings.
"""
from __future__ import annotations

import inspect
import json

import diffusers
import numpy as np
import pytest

import diffrt.schedulers as schedulers
from diffrt.errors import ConfigError
from diffrt.schedulers import from_name, get_scheduler_class, sampler_names
from diffrt.schedulers.names import parse_name, sampler_options

SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}

# name -> (Diffusers class, the settings the docs give for it)
DOCS_TABLE = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                            "algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "Euler sgm_uniform": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "Euler simple": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "DPM++ 2M Exponential": ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace",
                                                             "use_exponential_sigmas": True}),
    "DPM++ 2M beta": ("DPMSolverMultistepScheduler", {"timestep_spacing": "linspace", "use_beta_sigmas": True}),
}
UNAVAILABLE = ["DPM fast", "DPM adaptive", "dpm_fast", "dpm_adaptive", "DPM++ 2S a", "DPM++ 2S a Karras",
               "dpmpp_2s_ancestral"]


def _json(value: object) -> object:
    """A config value as it reads back from scheduler_config.json (tuples become lists)."""
    return json.loads(json.dumps(value))


def _compatible_config(reference: object, ours: object) -> None:
    """Every config key of ours equals Diffusers' (keys Diffusers lacks are ours alone and skipped)."""
    theirs = dict(reference.config)
    for key, value in ours.config.items():
        if not key.startswith("_") and key in theirs:
            assert _json(value) == _json(theirs[key]), key


@pytest.mark.parametrize("name", list(DOCS_TABLE))
def test_name_follows_the_diffusers_docs_table(name: str) -> None:
    class_name, settings = DOCS_TABLE[name]
    got_class, options = sampler_options(name)
    assert got_class == class_name
    assert {k: options[k] for k in settings} == settings
    cls = get_scheduler_class(class_name)
    scheduler = from_name(name, SD_CONFIG)
    assert type(scheduler) is cls
    for key, value in settings.items():
        assert scheduler.config[key] == value, key
    assert scheduler.config.beta_schedule == "scaled_linear"  # the model's config is kept underneath


@pytest.mark.parametrize("name", sampler_names())
def test_every_name_builds_what_diffusers_builds(name: str) -> None:
    """Same class, same config, same timesteps as Diffusers' class built from the model config plus the name's
    settings; a schedule type the scheduler has no key for is refused with the key named."""
    class_name, options = sampler_options(name)
    cls = get_scheduler_class(class_name)
    _, schedule = parse_name(name)
    reference_cls = getattr(diffusers, class_name)
    reference_keys = set(inspect.signature(reference_cls.__init__).parameters)
    needed = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas",
              "sgm_uniform": "timestep_spacing", "simple": "timestep_spacing", None: None}[schedule]
    if needed is not None and needed not in reference_keys:
        with pytest.raises(ConfigError, match=f"needs its `{needed}`"):
            from_name(name, SD_CONFIG)
        return
    ours = from_name(name, SD_CONFIG)
    reference = reference_cls.from_config(SD_CONFIG, **{k: v for k, v in options.items() if k in reference_keys})
    assert type(ours) is cls
    _compatible_config(reference, ours)
    ours.set_timesteps(12)
    reference.set_timesteps(12)
    np.testing.assert_allclose(np.asarray(ours.timesteps, np.float64), reference.timesteps.numpy().astype(np.float64),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spelling", ["DPM++ 2M Karras", "dpm++ 2m karras", "DPM++2M  Karras", "dpmpp_2m_karras",
                                      " DPM++ 2M KARRAS ", "dpmpp-2m-karras"])
def test_names_ignore_case_spacing_and_separators(spelling: str) -> None:
    assert parse_name(spelling) == ("DPM++ 2M", "Karras")


@pytest.mark.parametrize("alias, canonical", [("euler_ancestral", "Euler a"), ("dpm_2", "DPM2"),
                                              ("dpm_2_ancestral", "DPM2 a"), ("uni_pc", "UniPC"),
                                              ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_sde", "DPM++ SDE"),
                                              ("euler_ancestral_sgm_uniform", "Euler a")])
def test_comfyui_sampler_names_are_understood(alias: str, canonical: str) -> None:
    assert parse_name(alias)[0] == canonical


@pytest.mark.parametrize("name", UNAVAILABLE)
def test_samplers_missing_from_diffusers_are_refused_clearly(name: str) -> None:
    with pytest.raises(ValueError, match="is not available in Diffusers"):
        from_name(name)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        from_name("Euler Turbo 9000")
    message = str(error.value)
    assert message.startswith("`name` must be a sampler name")
    for known in ("'DPM++ 2M'", "'Euler a'", "'PLMS'", "'Karras'", "'sgm_uniform'", "got 'Euler Turbo 9000'"):
        assert known in message


def test_name_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="`name` must be a sampler name string; got 3"):
        from_name(3)


def test_schedule_type_the_scheduler_lacks_is_refused() -> None:
    with pytest.raises(ConfigError, match="EulerAncestralDiscreteScheduler supports \\('Karras' needs its "
                                          "`use_karras_sigmas`\\)"):
        from_name("Euler a Karras")


def test_name_settings_override_the_model_config_and_overrides_win() -> None:
    saved = {**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
             "algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    plain = from_name("DPM++ 2M", saved)
    assert (plain.config.use_karras_sigmas, plain.config.algorithm_type, plain.config.solver_order) == \
        (False, "dpmsolver++", 2)
    overridden = from_name("DPM++ 2M Karras", saved, use_karras_sigmas=False, timestep_spacing="trailing")
    assert (overridden.config.use_karras_sigmas, overridden.config.timestep_spacing) == (False, "trailing")


def test_config_may_be_a_dict_scheduler_file_or_folder(tmp_path) -> None:
    model = tmp_path / "model"
    (model / "scheduler").mkdir(parents=True)
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_CONFIG))
    reference_config = diffusers.PNDMScheduler.from_config(SD_CONFIG).config
    sources = [SD_CONFIG, reference_config, from_name("Euler", SD_CONFIG), model, model / "scheduler",
               model / "scheduler" / "scheduler_config.json", str(model)]
    built = [from_name("Euler", source) for source in sources]
    for scheduler in built:
        assert (scheduler.config.beta_schedule, scheduler.config.steps_offset) == ("scaled_linear", 1)
        scheduler.set_timesteps(7)
        np.testing.assert_array_equal(scheduler.timesteps, built[0].timesteps)


def test_config_none_uses_the_class_defaults() -> None:
    assert from_name("Euler").config.beta_schedule == "linear"


def test_a_name_whose_class_diffrt_lacks_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(schedulers._REGISTRY, "LCMScheduler", raising=False)
    with pytest.raises(ConfigError, match="'LCM' needs LCMScheduler, which it does not implement yet"):
        from_name("LCM")


def test_sampler_names_parse_back_to_themselves() -> None:
    names = sampler_names()
    assert "DPM++ 2M SDE Karras" in names and "Euler a" in names and "DPM fast" not in names
    for name in names:
        sampler, schedule = parse_name(name)
        assert name == (f"{sampler} {schedule}" if schedule else sampler)
