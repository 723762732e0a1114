"""Config round trips for every registered scheduler (``registered_names()`` at collection time).

* ``save_config`` then ``from_config`` (from the folder) rebuilds the same config and the same schedule;
* the saved ``scheduler_config.json`` loads into Diffusers' class with the same values, and a file Diffusers saved
  loads into ours with the same values and schedule;
* converting a config to each compatible class keeps the keys exactly as Diffusers' ``from_config`` does for the
  same pair: every config key of the target equals Diffusers' value;
* ``compatibles`` names what Diffusers names (restricted to the classes diffrt has).

Diffusers' KDPM2 constructors take about a second (they interpolate a 1000-step schedule in Python), so for those
targets the expected config comes from Diffusers' ``extract_init_dict``, the step of ``from_config`` that picks the
init arguments (KDPM2's ``__init__`` records them unchanged).
"""
from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest

from diffrt.schedulers import get_scheduler_class, registered_names
from diffrt.schedulers.base import init_keys

NAMES = registered_names()
SLOW_REFERENCE = {"KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
# stable-diffusion-v1-5's scheduler_config.json: a real config that leaves most keys at their defaults
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
# non-default values for whichever of these keys a class has, so a round trip has something to keep
NON_DEFAULTS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "timestep_spacing": "trailing", "steps_offset": 1, "prediction_type": "v_prediction",
                "use_karras_sigmas": True, "sigma_schedule": "exponential", "sigma_data": 1.0, "shift": 3.0,
                "solver_order": 3}


def as_json(value: Any) -> Any:
    """A value as scheduler_config.json stores it (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist()))


def public(config: Any) -> dict[str, Any]:
    return {k: as_json(v) for k, v in dict(config).items() if not k.startswith("_")}


def non_default_config(cls: type) -> dict[str, Any]:
    return {k: v for k, v in NON_DEFAULTS.items() if k in init_keys(cls)}


def assert_same_keys_as(ours: Any, reference_config: dict[str, Any], context: str) -> None:
    """Every config key of ours that Diffusers' class also has carries Diffusers' value."""
    mine, theirs = public(ours.config), public(reference_config)
    differing = {k: (mine[k], theirs[k]) for k in mine if k in theirs and mine[k] != theirs[k]}
    assert not differing, f"{context}: (ours, Diffusers') differ for {differing}"


@functools.lru_cache(maxsize=None)
def reference_class(name: str) -> type:
    return getattr(diffusers, name)


@functools.lru_cache(maxsize=None)
def _diffusers_config(name: str) -> str:
    return json.dumps(dict(reference_class(name).from_config(SD15).config))


def diffusers_config(name: str) -> dict[str, Any]:
    """Diffusers' ``name`` built from SD 1.5's config: its ``.config`` (built once per class)."""
    return json.loads(_diffusers_config(name))


def reference_config_for(name: str, source: dict[str, Any]) -> dict[str, Any]:
    """The config Diffusers' ``name`` class gets from ``source`` via ``from_config``."""
    cls = reference_class(name)
    if name not in SLOW_REFERENCE:
        return dict(cls.from_config(source).config)
    init_dict, _, _ = cls.extract_init_dict(dict(source))
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    return {**defaults, **init_dict}


def schedule(scheduler: Any) -> np.ndarray:
    scheduler.set_timesteps(10)
    return np.asarray(scheduler.timesteps)


# -------------------------------------------------------------------------------------------- save / from_config
@pytest.mark.parametrize("name", NAMES)
def test_save_then_from_config_rebuilds_the_scheduler(name: str, tmp_path: Path) -> None:
    cls = get_scheduler_class(name)
    original = cls.from_config(non_default_config(cls))
    path = original.save_config(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scheduler_config.json"]  # no temp file left behind
    reloaded = cls.from_config(tmp_path)
    assert as_json(dict(reloaded.config)) == as_json(dict(original.config))
    assert json.loads(path.read_text())["_class_name"] == name
    np.testing.assert_array_equal(schedule(reloaded), schedule(original))


@pytest.mark.parametrize("name", NAMES)
def test_saved_config_reads_the_same_in_diffusers_and_back(name: str, tmp_path: Path) -> None:
    cls = get_scheduler_class(name)
    ours = cls.from_config(non_default_config(cls))
    ours.save_config(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert_same_keys_as(ours, reference_config_for(name, saved), f"Diffusers reading our {name} file")
    if name in SLOW_REFERENCE:
        return  # the Diffusers-written file below needs an instance
    reference_class(name).from_config(non_default_config(cls)).save_config(tmp_path / "theirs")
    theirs = cls.from_config(tmp_path / "theirs")
    assert public(theirs.config) == public(ours.config)
    np.testing.assert_array_equal(schedule(theirs), schedule(ours))


# --------------------------------------------------------------------------------------- converting between classes
def pairs() -> list[tuple[str, str]]:
    """(source, target) for every registered class and each registered class in its ``_compatibles``."""
    result = []
    for name in NAMES:
        cls = get_scheduler_class(name)
        result += [(name, target) for target in cls._compatibles if target in NAMES and target != name]
    return result


@pytest.mark.parametrize("source, target", pairs(), ids=lambda n: n.replace("Scheduler", ""))
def test_converting_a_diffusers_config_keeps_keys_as_diffusers_does(source: str, target: str) -> None:
    """``Target.from_config(source_scheduler.config)``: the keys each side's target ends up with agree."""
    target_cls = get_scheduler_class(target)
    source_config = diffusers_config(source)  # carries _use_default_values
    converted = target_cls.from_config(source_config)
    assert_same_keys_as(converted, reference_config_for(target, source_config), f"{source} -> {target}")


@pytest.mark.parametrize("source, target", pairs(), ids=lambda n: n.replace("Scheduler", ""))
def test_converting_our_scheduler_keeps_keys_as_diffusers_does(source: str, target: str) -> None:
    """The same conversions from our scheduler's ``.config`` (the ``pipe.scheduler.config`` idiom): keys the source
    left at its defaults must take the target's defaults, as in Diffusers (SD 1.5's PNDM config -> Euler gets
    Euler's 'linspace' spacing, not PNDM's 'leading')."""
    source_cls, target_cls = get_scheduler_class(source), get_scheduler_class(target)
    converted = target_cls.from_config(source_cls.from_config(SD15).config)
    assert_same_keys_as(converted, reference_config_for(target, diffusers_config(source)), f"{source} -> {target}")


@pytest.mark.parametrize("name", NAMES)
def test_compatibles_name_what_diffusers_names(name: str) -> None:
    cls = get_scheduler_class(name)
    ours = {c.__name__ for c in cls.from_config({}).compatibles}
    theirs = {c.__name__ for c in reference_class(name)._get_compatibles()} & {*NAMES, name}
    assert ours == theirs
