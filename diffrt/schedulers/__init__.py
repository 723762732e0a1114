"""NumPy ports of the Diffusers schedulers, by their Diffusers class names.

Classes are imported lazily from the table below, so ``import diffrt.schedulers`` stays cheap; adding a scheduler
is one line in ``_REGISTRY``. ``from_config`` picks the class from a config's ``_class_name``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, invalid
from .base import SchedulerOutput as SchedulerOutput  # re-exported: part of the public API
from .base import load_config

if TYPE_CHECKING:
    from .base import SchedulerBase

# Diffusers class name -> "module:Class" (module relative to this package)
_REGISTRY: dict[str, str] = {
    "EulerDiscreteScheduler": "euler:EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler": "euler:EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler": "heun:HeunDiscreteScheduler",
    "DDIMScheduler": "ddim:DDIMScheduler",
    "DDPMScheduler": "ddpm:DDPMScheduler",
    "LCMScheduler": "lcm:LCMScheduler",
    "DPMSolverMultistepScheduler": "dpm_solver:DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler": "dpm_singlestep:DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler": "dpm_sde:DPMSolverSDEScheduler",
    "DDIMInverseScheduler": "inverse:DDIMInverseScheduler",
    "DPMSolverMultistepInverseScheduler": "inverse:DPMSolverMultistepInverseScheduler",
    "UniPCMultistepScheduler": "unipc:UniPCMultistepScheduler",
    "LMSDiscreteScheduler": "lms:LMSDiscreteScheduler",
    "PNDMScheduler": "pndm:PNDMScheduler",
    "KDPM2DiscreteScheduler": "kdpm2:KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler": "kdpm2:KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler": "deis:DEISMultistepScheduler",
    "TCDScheduler": "tcd:TCDScheduler",
    "EDMEulerScheduler": "edm:EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler": "edm:EDMDPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler": "flow_match:FlowMatchEulerDiscreteScheduler",
}

# names exported besides the scheduler classes: name -> "module:attribute"
_EXTRAS: dict[str, str] = {
    "AysSchedules": "ays:AysSchedules",
    "ays_schedule": "ays:ays_schedule",
    "from_name": "names:from_name",
    "sampler_names": "names:sampler_names",
}


def registered_names() -> list[str]:
    """Diffusers class names of every scheduler diffrt implements."""
    return list(_REGISTRY)


def get_scheduler_class(class_name: str) -> type[SchedulerBase]:
    """The diffrt scheduler class for a Diffusers scheduler class name."""
    target = _REGISTRY.get(class_name)
    if target is None:
        raise invalid("class_name", "one of " + ", ".join(sorted(_REGISTRY)), class_name, ConfigError)
    return _load(target)


def from_config(config: Any, **overrides: Any) -> Any:
    """Build the scheduler named by the config's ``_class_name`` (a dict, a scheduler's ``.config``, a
    ``scheduler_config.json`` path or a folder holding one) or by a scheduler object's class, with keyword
    overrides."""
    data = load_config(config)
    class_name = data.get("_class_name")
    if class_name is None and not isinstance(config, dict) and hasattr(config, "config"):
        class_name = type(config).__name__  # a scheduler object: its config need not carry _class_name
    if not isinstance(class_name, str):
        raise invalid("_class_name", "a scheduler class name in the config", class_name, ConfigError)
    return get_scheduler_class(class_name).from_config(data, **overrides)


def _load(target: str) -> Any:
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module_name}"), attribute)


def __getattr__(name: str) -> Any:
    target = _REGISTRY.get(name) or _EXTRAS.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _load(target)
    globals()[name] = value
    return value


__all__ = sorted([*_REGISTRY, *_EXTRAS, "SchedulerOutput", "from_config", "get_scheduler_class",
                  "registered_names"])


def __dir__() -> list[str]:
    return __all__
