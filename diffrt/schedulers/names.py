"""Sampler names users know from A1111 / k-diffusion / ComfyUI, mapped to schedulers as Diffusers documents it
(docs/source/en/api/schedulers/overview.md: the "A1111/k-diffusion" table and "Noise schedules and schedule types").

A name is a sampler ("DPM++ 2M", "Euler a", or ComfyUI's "dpmpp_2m", "euler_ancestral") optionally followed by a
schedule type ("Karras", "Exponential", "sgm_uniform", "simple", "beta"); matching ignores case, spaces, "_" and
"-". ``from_name("DPM++ 2M Karras", pipe_config)`` builds the scheduler from the model's scheduler config with the
sampler's and schedule's settings on top, and the caller's overrides on top of those.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError, invalid
from .base import init_keys, load_config

SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")

# display name -> (Diffusers class, config the sampler fixes). Sampler names set every key that defines them, so a
# config saved for a neighbour ("DPM++ 2M SDE") does not leak into "DPM++ 2M".
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    # Diffusers' table lists DPMSolverSinglestepScheduler here, a deterministic ODE solver; A1111's "DPM++ SDE" is
    # k-diffusion's sample_dpmpp_sde, which DPMSolverSDEScheduler ports (diffusers issue #4167).
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS = PNDM without the Runge-Kutta warm-up
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}

# A1111 samplers with no Diffusers scheduler (the table's "N/A" rows), with what comes closest
UNAVAILABLE: dict[str, str] = {
    "DPM fast": "",
    "DPM adaptive": "",
    "DPM++ 2S a": "; the closest is DPMSolverSinglestepScheduler",
}

# ComfyUI / k-diffusion function names of the same samplers
ALIASES: dict[str, str] = {
    "euler_ancestral": "Euler a",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "uni_pc": "UniPC",
}

# schedule type -> config, from Diffusers' "Noise schedules and schedule types" table
SCHEDULES: dict[str, dict[str, Any]] = {
    "Karras": {"use_karras_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "Exponential": {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    "beta": {"timestep_spacing": "linspace", "use_beta_sigmas": True},
}


# Flow-matching models (SD3, FLUX) predict a velocity: only their own Euler integrates it. Forge and ComfyUI call it
# "Euler" there, with the usual schedule types on its sigmas.
FLOW_MATCH_CLASSES = ("FlowMatchEulerDiscreteScheduler",)


def _flow_match_sampler(name: str, sampler: str) -> str:
    if sampler != "Euler":
        raise invalid("name", "'Euler' (optionally with a schedule type) for a flow-matching model (SD3, FLUX), "
                      "whose velocity prediction only the flow-matching Euler integrates", name)
    return FLOW_MATCH_CLASSES[0]


def _key(name: str) -> str:
    """Comparison key: lower case without spaces, '_' and '-', '++' as 'pp' ("DPM++ 2M" == "dpmpp_2m")."""
    return re.sub(r"[\s_\-]+", "", name.lower()).replace("++", "pp")


_SAMPLER_KEYS: dict[str, str] = {_key(n): n for n in [*SAMPLERS, *UNAVAILABLE]}
_SAMPLER_KEYS.update({_key(alias): target for alias, target in ALIASES.items()})
_SCHEDULE_KEYS: dict[str, str] = {_key(n): n for n in SCHEDULES}


def sampler_names() -> list[str]:
    """Every sampler name ``from_name`` knows, with and without a schedule type."""
    return [*SAMPLERS, *(f"{s} {t}" for s in SAMPLERS for t in SCHEDULES)]


def parse_name(name: str) -> tuple[str, str | None]:
    """(sampler display name, schedule type or None) for a user's sampler name; errors name the known ones."""
    if not isinstance(name, str):
        raise invalid("name", "a sampler name string", name)
    key = _key(name)
    matches = [(sampler, key[len(k):]) for k, sampler in _SAMPLER_KEYS.items()
               if key.startswith(k) and (key[len(k):] == "" or key[len(k):] in _SCHEDULE_KEYS)]
    if not matches:
        raise invalid("name", "a sampler name, optionally followed by a schedule type: samplers "
                      + ", ".join(map(repr, [*SAMPLERS, *ALIASES])) + "; schedule types "
                      + ", ".join(map(repr, SCHEDULES)), name)
    sampler, rest = max(matches, key=lambda m: len(m[0]))
    if sampler in UNAVAILABLE:
        raise invalid("name", f"a sampler Diffusers implements; {sampler!r} is not available in Diffusers"
                      f"{UNAVAILABLE[sampler]}", name)
    return sampler, (_SCHEDULE_KEYS[rest] if rest else None)


def sampler_options(name: str) -> tuple[str, dict[str, Any]]:
    """(Diffusers class name, config keys the name sets) for a sampler name, e.g. "DPM++ 2M SDE Karras" ->
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
    "use_karras_sigmas": True, ...}). Without a schedule type the sigma-schedule flags are switched off; keys
    the class does not have are left out."""
    return _options(*parse_name(name))


def _options(sampler: str, schedule: str | None) -> tuple[str, dict[str, Any]]:
    class_name, options = SAMPLERS[sampler]
    schedule_options = SCHEDULES[schedule] if schedule else {}
    flags = {flag: schedule_options.get(flag, False) for flag in SIGMA_FLAGS}
    return class_name, {**flags, **options, **schedule_options}


def from_name(name: str, config: Any = None, **overrides: Any) -> Any:
    """The scheduler for an A1111 / ComfyUI sampler name, built on ``config`` (the model's scheduler config: a
    dict, a scheduler or its ``.config``, a ``scheduler_config.json`` or a folder holding one; None for the class
    defaults), with keyword ``overrides`` applied last.

    Raises ``ValueError`` for an unknown name (listing the known ones), a sampler Diffusers does not have
    ("DPM fast", "DPM adaptive", "DPM++ 2S a"), or a schedule type the sampler's scheduler cannot use."""
    from . import get_scheduler_class, registered_names

    sampler, schedule = parse_name(name)
    class_name, options = _options(sampler, schedule)
    data = {} if config is None else load_config(config)
    if data.get("_class_name") in FLOW_MATCH_CLASSES:
        class_name = _flow_match_sampler(name, sampler)
    if class_name not in registered_names():
        raise invalid("name", f"a sampler diffrt implements; {name!r} needs {class_name}, which it does not "
                      "implement yet", name, ConfigError)
    cls = get_scheduler_class(class_name)
    keys = init_keys(cls)
    for key in (SCHEDULES[schedule] if schedule else {}):
        if key not in keys:
            raise invalid("name", f"a schedule type {class_name} supports ({schedule!r} needs its `{key}`)", name,
                          ConfigError)
    options = {k: v for k, v in options.items() if k in keys}
    return cls.from_config(data, **{**options, **overrides})
