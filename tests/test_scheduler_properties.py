"""Properties every registered scheduler keeps, over random valid configs (hypothesis).

For each class in ``diffrt.schedulers.registered_names()`` (read at collection time, so classes added later are
covered), configs are drawn from the keys the class shares with its Diffusers counterpart: beta schedule,
timestep spacing, steps offset, prediction type, one sigma-schedule flag where supported, EDM's sigma schedule,
flow shift, solver order; step counts 1..50. Checked:

* the schedule is finite, and sigmas are monotone (non-increasing; non-decreasing for the inverse schedulers and
  ``invert_sigmas``, which run from data to noise);
* ``len(timesteps)`` equals what Diffusers' class computes for the same config and step count;
* ``clone()`` gives independent runs: two clones stepped in lockstep on different inputs, one stopping early,
  leave each other's results and the original untouched (final samples equal a run made alone, exactly).

Diffusers' KDPM2 constructors interpolate a 1000-step schedule in Python (about a second each here), so those
classes get fewer examples.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import diffusers
import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from scheduler_harness import tanh_model

from diffrt.errors import DiffrtError, InputError
from diffrt.rng import Generator
from diffrt.schedulers import get_scheduler_class, registered_names
from diffrt.schedulers.base import init_keys

NAMES = registered_names()
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
SLOW_REFERENCE = {"KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
SHAPE = (1, 4, 4, 4)


def ours_and_reference(name: str) -> tuple[type, type]:
    """(ours, Diffusers') for a registered name."""
    return get_scheduler_class(name), getattr(diffusers, name)


def shared_keys(ours: type, reference: type) -> set[str]:
    return init_keys(ours) & set(inspect.signature(reference.__init__).parameters)


@st.composite
def configs(draw: st.DrawFn, keys: set[str]) -> dict[str, Any]:
    """A valid config over ``keys``: each option drawn only where the class has the key."""
    choices = {
        "beta_schedule": ["linear", "scaled_linear", "squaredcos_cap_v2"],
        "timestep_spacing": ["linspace", "leading", "trailing"],
        "steps_offset": [0, 1],
        "prediction_type": ["epsilon", "v_prediction"],
        "sigma_schedule": ["karras", "exponential"],
        "solver_order": [1, 2, 3],
    }
    config = {key: draw(st.sampled_from(values)) for key, values in choices.items() if key in keys}
    if "beta_schedule" in config and config["beta_schedule"] == "scaled_linear":
        config.update(beta_start=0.00085, beta_end=0.012)
    flags = [flag for flag in SIGMA_FLAGS if flag in keys]
    if flags:
        flag = draw(st.sampled_from([None, *flags]))
        if flag:
            config[flag] = True
    if "shift" in keys:
        config["shift"] = draw(st.sampled_from([1.0, 3.0]))
    if "use_dynamic_shifting" in keys and "shift" in keys:
        config["use_dynamic_shifting"] = draw(st.booleans())
    return config


def schedule_kwargs(config: dict[str, Any], steps: int, data: st.DataObject) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": steps}
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = data.draw(st.floats(0.3, 2.0), label="mu")
    return kwargs


def start(scheduler: Any, seed: int) -> dict[str, Any]:
    """Begin a run at index 0 (a schedule may repeat its first timestep, e.g. cosine betas with karras sigmas,
    where the timestep lookup would start at the repeat, as in Diffusers); the step's generator kwargs."""
    scheduler.set_begin_index(0)
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": Generator("cpu").manual_seed(seed)}
    return {}


def run(scheduler: Any, sample: np.ndarray, seed: int, stop: int | None = None) -> np.ndarray:
    """A loop with the stand-in model; stochastic steps draw from a generator seeded with ``seed``."""
    kwargs = start(scheduler, seed)
    for t in list(scheduler.timesteps)[:stop]:
        model_output = tanh_model(scheduler.scale_model_input(sample, t), float(t))
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
    return sample


def lockstep(first: Any, second: Any, x1: np.ndarray, x2: np.ndarray, stop: int) -> np.ndarray:
    """Step two schedulers alternately (the second on other inputs, another seed, stopping after ``stop`` steps);
    returns the first one's final sample."""
    loops = []
    for scheduler, sample, seed in ((first, x1, 7), (second, x2, 8)):
        loops.append([scheduler, sample, start(scheduler, seed)])
    for i, t in enumerate(first.timesteps):
        for j, (scheduler, sample, kwargs) in enumerate(loops):
            if j == 1 and i >= stop:
                continue
            model_output = tanh_model(scheduler.scale_model_input(sample, t), float(t))
            loops[j][1] = scheduler.step(model_output, t, sample, **kwargs).prev_sample
    return loops[0][1]


def built_or_reject(build: Callable[[], Any], kwargs: dict[str, Any], refusal: type[BaseException]) -> Any:
    """A scheduler with its schedule set, or drop the example when it is refused: a config Diffusers fails on is
    not a valid one, and ours may refuse more, by design, with a typed error (e.g. PNDM's PRK warm-up under 4
    steps); any other exception from ours is a failure."""
    try:
        scheduler = build()
        scheduler.set_timesteps(**kwargs)
    except refusal:
        reject()
    return scheduler


def examples(name: str, count: int) -> settings:
    """Hypothesis settings: derandomized, so CI runs the same examples every time (run with
    ``--hypothesis-seed`` and ``derandomize`` off to explore further)."""
    count = min(count, 3) if name in SLOW_REFERENCE else count
    return settings(max_examples=count, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def is_inverse(name: str, config: dict[str, Any]) -> bool:
    return "Inverse" in name or bool(config.get("invert_sigmas"))


@pytest.mark.parametrize("name", NAMES)
def test_schedule_is_finite_monotone_and_as_long_as_diffusers(name: str) -> None:
    ours_cls, reference_cls = ours_and_reference(name)
    keys = shared_keys(ours_cls, reference_cls)

    @examples(name, 8)
    @given(config=configs(keys), steps=st.integers(1, 50), data=st.data())
    def check(config: dict[str, Any], steps: int, data: st.DataObject) -> None:
        kwargs = schedule_kwargs(config, steps, data)
        reference = built_or_reject(lambda: reference_cls.from_config(config), kwargs, Exception)
        ours = built_or_reject(lambda: ours_cls.from_config(config), kwargs, DiffrtError)
        timesteps = np.asarray(ours.timesteps, dtype=np.float64)
        assert np.isfinite(timesteps).all(), f"non-finite timesteps for {config}, {kwargs}"
        assert len(timesteps) == len(reference.timesteps), f"{len(timesteps)} != {len(reference.timesteps)} " \
                                                           f"timesteps for {config}, {kwargs}"
        sigmas = getattr(ours, "sigmas", None)
        if sigmas is not None:
            sigmas = np.asarray(sigmas, dtype=np.float64)
            assert np.isfinite(sigmas).all(), f"non-finite sigmas for {config}, {kwargs}"
            steps_between = np.diff(sigmas) * (-1 if is_inverse(name, config) else 1)
            assert (steps_between <= 0).all(), f"sigmas not monotone for {config}, {kwargs}: {sigmas}"

    check()


@pytest.mark.parametrize("name", NAMES)
def test_clones_run_independently(name: str) -> None:
    ours_cls, reference_cls = ours_and_reference(name)
    keys = shared_keys(ours_cls, reference_cls)

    @examples(name, 5)
    @given(config=configs(keys), steps=st.integers(1, 12), data=st.data())
    def check(config: dict[str, Any], steps: int, data: st.DataObject) -> None:
        original = built_or_reject(lambda: ours_cls.from_config(config), schedule_kwargs(config, steps, data),
                                   DiffrtError)
        tables = {k: np.array(getattr(original, k), copy=True) for k in ("timesteps", "sigmas")
                  if getattr(original, k, None) is not None}
        rng = np.random.default_rng(steps)
        x1 = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(original.init_noise_sigma)
        x2 = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(original.init_noise_sigma)
        try:
            alone = run(original.clone(), x1, seed=7)
        except InputError:  # the config diverges alone (Euler a, cosine betas, trailing: NaN in Diffusers too)
            reject()
        stop = data.draw(st.integers(0, len(original.timesteps)), label="second clone stops after")
        together = lockstep(original.clone(), original.clone(), x1, x2, stop)
        np.testing.assert_array_equal(together, alone, err_msg=f"clones interfered for {config}")
        assert original.step_index is None, "stepping clones moved the original"
        for key, table in tables.items():
            np.testing.assert_array_equal(getattr(original, key), table, err_msg=f"{key} changed")
        np.testing.assert_array_equal(run(original, x1, seed=7), alone, err_msg="the original no longer runs alike")

    check()
