"""Shared scheduler machinery: config handling, run state, beta / timestep / sigma schedules, parameterisations.

Everything here is NumPy only (no torch, transformers or diffusers). The numeric functions reproduce Diffusers'
dtype path (it builds its tables in torch float32) so that tables match bit for bit where the arithmetic allows.
Family modules (``euler.py``, ``ddim.py``, ...) import these functions; they never copy them.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence, TypeVar

import numpy as np

from ..errors import ConfigError, InputError, invalid
from ..package.files import read_json, write_json
from ..package.names import SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

CONFIG_NAME = SCHEDULER_CONFIG.name  # scheduler_config.json, the file diffusers writes
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
KARRAS_COMPATIBLES: tuple[str, ...] = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)  # Diffusers' KarrasDiffusionSchedulers: the schedulers that accept each other's configs


# --------------------------------------------------------------------------------------------------- outputs, config
@dataclass
class SchedulerOutput:
    """What ``step`` returns: the next sample and, where the scheduler computes it, the predicted x0."""

    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, index: int) -> np.ndarray | None:
        return self.to_tuple()[index]


class FrozenConfig(dict):
    """Read-only config: a ``dict`` (so Diffusers' ``from_config`` accepts it) whose keys are also attributes.

    ``defaulted`` names the keys that took their constructor default (Diffusers' ``_use_default_values``), kept
    off the dict so configs compare and save cleanly, yet honoured when another class converts this config."""

    defaulted: tuple[str, ...]

    def __init__(self, data: Any = (), defaulted: Iterable[str] = ()) -> None:
        super().__init__(data)
        object.__setattr__(self, "defaulted", tuple(defaulted))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def _readonly(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a scheduler config is read-only; build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _readonly
    update = pop = popitem = setdefault = clear = __ior__ = _readonly

    def __reduce__(self) -> tuple:  # pickle rebuilds from a plain dict instead of item assignment
        return (FrozenConfig, (dict(self), self.defaulted))

    def __copy__(self) -> FrozenConfig:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenConfig:
        return self


def register_config(init: Callable) -> Callable:
    """Decorate a scheduler ``__init__``: its keyword defaults are the config schema, as in Diffusers."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: SchedulerBase, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        given = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        # Like Diffusers, remember which keys took their defaults: a compatible class converting this config
        # later must not inherit them as if the user had set them.
        self._config = FrozenConfig({"_class_name": type(self).__name__, **values}, sorted(set(values) - given))
        init(self, *args, **kwargs)

    return wrapper


def init_keys(cls: type[SchedulerBase]) -> set[str]:
    """The config keys of a scheduler class: its ``__init__`` parameters."""
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args", "kwargs")}


def load_config(source: Any) -> dict[str, Any]:
    """A config as a plain dict from a mapping, a scheduler, a JSON file, or a folder holding one."""
    if isinstance(getattr(source, "config", None), Mapping):
        source = source.config
    if isinstance(source, Mapping):
        data = dict(source)
        defaulted = getattr(source, "defaulted", None)  # a FrozenConfig's; plain mappings have none
        if defaulted and "_use_default_values" not in data:
            data["_use_default_values"] = list(defaulted)
        return data
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        for candidate in (path, path / CONFIG_NAME, path / "scheduler" / CONFIG_NAME):
            if candidate.is_file():
                return read_json(candidate, required=True, error=ConfigError)
        raise invalid("config", f"a {CONFIG_NAME} file or a folder containing one", str(source), ConfigError)
    raise invalid("config", "a dict, a scheduler config, a JSON file path or a folder", type(source).__name__)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a ConfigError naming ``name`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise invalid(name, "one of " + ", ".join(repr(c) for c in choices), value, ConfigError)


# ---------------------------------------------------------------------------------------------- the scheduler base
_S = TypeVar("_S", bound="SchedulerBase")


class SchedulerBase:
    """Config, run state and bookkeeping shared by every scheduler. Subclasses decorate ``__init__`` with
    ``@register_config`` and keep per-run state (step index, solver history) resettable by ``_reset_run_state``.
    Tables built in ``__init__`` / ``set_timesteps`` are read-only arrays, so ``clone()`` can share them."""

    order: int = 1
    _compatibles: tuple[str, ...] = ()
    _config: FrozenConfig
    timesteps: np.ndarray
    _step_index: int | None  # None until a run's first scale_model_input / step
    _begin_index: int | None  # None unless set_begin_index was called

    # ---- config
    @property
    def config(self) -> FrozenConfig:
        return self._config

    @classmethod
    def from_config(cls: type[_S], config: Any = None, **overrides: Any) -> _S:
        """Build from a config (dict, a scheduler's ``.config``, JSON path or folder) plus keyword overrides.

        Like Diffusers: ``_use_default_values`` keys fall back to defaults, private keys are dropped, keys of other
        scheduler classes are ignored quietly, and any other unknown key is logged and ignored."""
        data = {} if config is None else load_config(config)
        defaulted = set(data.pop("_use_default_values", []) or [])
        data = {k: v for k, v in data.items() if k not in defaulted}
        expected = init_keys(cls)
        kwargs = {k: v for k, v in data.items() if k in expected}
        unknown = sorted(k for k in data if k not in expected and not k.startswith("_"))
        for key, value in overrides.items():
            if key in expected:
                kwargs[key] = value
            else:
                logger.warning("%s ignores unknown override %r=%r", cls.__name__, key, value)
        quiet = _foreign_keys(cls, data.get("_class_name", cls.__name__))
        noisy = [k for k in unknown if quiet is not None and k not in quiet]
        if noisy:
            logger.warning("%s ignores config keys it does not know: %s", cls.__name__, noisy)
        if len(noisy) < len(unknown):
            logger.debug("%s ignores keys of other scheduler classes: %s", cls.__name__,
                         [k for k in unknown if k not in noisy])
        scheduler = cls(**kwargs)
        # Diffusers keeps every key the class did not consume ("hidden" keys, e.g. a PNDM config's clip_sample)
        # so that converting on to a compatible class later (DDIM) still sees them.
        hidden = {k: v for k, v in data.items() if k not in kwargs and k != "_class_name"}
        scheduler._config = FrozenConfig({**scheduler._config, **hidden}, scheduler._config.defaulted)
        return scheduler

    def _update_config(self, **changes: Any) -> None:
        """Rewrite config values at construction (deprecated aliases mapped to their current names)."""
        self._config = FrozenConfig({**self._config, **changes}, self._config.defaulted)

    def save_config(self, save_directory: str | os.PathLike) -> Path:
        """Write ``scheduler_config.json`` into ``save_directory`` atomically; returns the file path."""
        folder = Path(save_directory)
        if folder.is_file():
            raise invalid("save_directory", "a folder", str(save_directory))
        path = folder / CONFIG_NAME
        data = {k: _json_value(v) for k, v in self._config.items()}
        write_json(path, dict(sorted(data.items())))
        return path

    @property
    def compatibles(self) -> list[type]:
        """The diffrt scheduler classes that accept this one's config (Diffusers' ``_compatibles``, by name)."""
        from . import get_scheduler_class, registered_names

        names = [type(self).__name__] + [n for n in self._compatibles if n != type(self).__name__]
        return [get_scheduler_class(n) for n in names if n in registered_names()]

    def __len__(self) -> int:
        return int(self._config["num_train_timesteps"])

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps({k: _json_value(v) for k, v in self._config.items()})}"

    # ---- run state
    @property
    def step_index(self) -> int | None:
        """Index of the current step; ``None`` until the first ``scale_model_input`` / ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by pipelines (img2img) through ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if not isinstance(begin_index, (int, np.integer)) or isinstance(begin_index, bool) or begin_index < 0:
            raise invalid("begin_index", "an int >= 0", begin_index)
        self._begin_index = int(begin_index)

    def _reset_run_state(self) -> None:
        """Forget one run's progress. Subclasses with more state extend this and call super()."""
        self._step_index = None
        self._begin_index = None

    def clone(self: _S) -> _S:
        """A fresh run on the same config and schedule: tables are shared (read-only), run state is reset."""
        other = copy.copy(self)
        other._reset_run_state()
        return other

    def index_for_timestep(self, timestep: Any, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of ``timestep`` in the schedule; the second match when it repeats (Diffusers' rule, so an
        img2img run that starts mid-schedule does not skip a sigma)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = np.flatnonzero(schedule == np.asarray(timestep).item())
        if len(indices) == 0:
            raise invalid("timestep", "one of the scheduler's timesteps", _scalar(timestep))
        return int(indices[1] if len(indices) > 1 else indices[0])

    def _init_step_index(self, timestep: Any) -> int:
        """Place a run at its first call: the begin index if set, else the position of ``timestep``; returns it."""
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        return self._step_index

    def _current_step_index(self, timestep: Any) -> int:
        """The index of the current step, placing the run first if this is its first call."""
        return self._init_step_index(timestep) if self._step_index is None else self._step_index

    def _active_step_index(self) -> int:
        """The index of the step in progress, for the helpers ``step`` calls; an error before a run has begun."""
        if self._step_index is None:
            raise InputError("no step in progress: a run begins with its first `step` or `scale_model_input`")
        return self._step_index

    def _start_step(self, model_output: np.ndarray, timestep: Any) -> int:
        """Common start of ``step``: a schedule must be set, the step index known, the model output finite.
        Returns the step index; the step stores index + 1 when it is done."""
        if getattr(self, "num_inference_steps", None) is None:
            raise InputError("call `set_timesteps` before `step`")
        step_index = self._current_step_index(timestep)
        check_finite(model_output, step_index, timestep)
        return step_index


def _foreign_keys(cls: type[SchedulerBase], source_class: str) -> set[str] | None:
    """Config keys ``cls`` drops without a warning: those of its compatible classes and of the class the config
    was written for. None (drop all quietly) when that class is one diffrt does not implement: its keys are
    unknown to us, and Diffusers drops a compatible class's keys silently too."""
    from . import get_scheduler_class, registered_names

    names = set(registered_names())
    if source_class != cls.__name__ and source_class not in names:
        return None
    keys: set[str] = set()
    for name in {*cls._compatibles, source_class} & names:
        keys |= init_keys(get_scheduler_class(name))
    return keys


def _scalar(value: Any) -> Any:
    array = np.asarray(value)
    return array.item() if array.size == 1 else value


def freeze(array: np.ndarray) -> np.ndarray:
    """Mark a schedule table read-only so clones can share it safely."""
    array.flags.writeable = False
    return array


# ------------------------------------------------------------------------------------------ validation and checks
def check_finite(model_output: np.ndarray, step_index: int, timestep: Any) -> None:
    """Raise when the model output holds NaN or Inf, naming the step. The happy path is one BLAS dot product
    (NaN/Inf propagate into x.x; an overflow to inf merely sends us to the exact count)."""
    flat = model_output.reshape(-1)
    if flat.dtype in (np.float32, np.float64):
        if np.isfinite(np.dot(flat, flat)):
            return
    elif np.isfinite(flat).all():
        return
    bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
    if bad:
        raise InputError(
            f"`model_output` must be finite; got {bad} NaN/Inf values at step {step_index} "
            f"(timestep {_scalar(timestep)})"
        )


def check_set_timesteps(
    num_inference_steps: Any,
    timesteps: Any,
    sigmas: Any,
    num_train_timesteps: int,
    max_steps: int | None = None,
) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """Validate ``set_timesteps`` arguments: exactly one given; a step count >= 1; custom timesteps nonempty,
    strictly descending, in [0, num_train_timesteps); custom sigmas (n steps -> n + 1 values, the last the final
    sigma, as in Diffusers) strictly descending and >= 0. Returns (the step count, custom timesteps or None,
    custom sigmas or None), the arrays as float64; the count is that of the custom schedule when one is given."""
    given = [n for n, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                            ("sigmas", sigmas)) if v is not None]
    if len(given) != 1:
        raise InputError(
            f"exactly one of `num_inference_steps`, `timesteps`, `sigmas` must be given; got {given or 'none'}"
        )
    if num_inference_steps is not None:
        limit = f" and <= {max_steps}" if max_steps is not None else ""
        if (not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool)
                or num_inference_steps < 1 or (max_steps is not None and num_inference_steps > max_steps)):
            raise invalid("num_inference_steps", f"an int >= 1{limit}", num_inference_steps)
        return int(num_inference_steps), None, None
    if timesteps is not None:
        values = _descending("timesteps", timesteps, minimum_len=1)
        if values[-1] < 0 or values[0] >= num_train_timesteps:
            raise invalid("timesteps", f"within [0, {num_train_timesteps})", _short(values))
        return len(values), values, None
    values = _descending("sigmas", sigmas, minimum_len=2)
    if values[-1] < 0:
        raise invalid("sigmas", "all >= 0", _short(values))
    return len(values) - 1, None, values


def _descending(name: str, values: Any, minimum_len: int) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid(name, "a sequence of numbers", values) from None
    if array.ndim != 1 or len(array) < minimum_len:
        raise invalid(name, f"a 1-D sequence of at least {minimum_len} values", _short(array))
    if not np.isfinite(array).all():
        raise invalid(name, "finite values", _short(array))
    if np.any(np.diff(array) >= 0):
        raise invalid(name, "strictly descending", _short(array))
    return array


def _short(array: np.ndarray) -> str:
    items = np.asarray(array).ravel().tolist()
    return str(items if len(items) <= 12 else items[:12] + ["..."])


# --------------------------------------------------------------------------------------------------- beta schedules
def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit: float32 step, both halves computed from
    their own end, and a fused multiply-add (torch's CPU kernel compiles ``start + step * i`` to an FMA)."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    index = np.arange(steps, dtype=np.float64)
    half = steps // 2
    low = np.float64(start32) + step * index[:half]
    high = np.float64(end32) - step * (steps - 1 - index[half:])
    return np.concatenate([low, high]).astype(np.float32)


def betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999, transform: str = "cosine") -> np.ndarray:
    """Betas that discretise an alpha-bar curve (Nichol & Dhariwal 2021's cosine schedule by default)."""
    if transform == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    elif transform == "exp":
        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)
    elif transform == "laplace":
        def alpha_bar(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    else:
        raise invalid("alpha_transform_type", "one of 'cosine', 'exp', 'laplace'", transform, ConfigError)
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.array(betas, dtype=np.float32)


def make_betas(
    beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int, trained_betas: Any = None
) -> np.ndarray:
    """The training betas in float32, as Diffusers computes them."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32).copy()
    if beta_schedule == "linear":
        return torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule in ("exp", "laplace"):  # Heun's / DDPM's extra alpha-bar curves
        return betas_for_alpha_bar(num_train_timesteps, transform=beta_schedule)
    if beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022); DDPM only
        x = torch_linspace_f32(-6, 6, num_train_timesteps)
        sigmoid = np.float32(1) / (np.float32(1) + np.exp(-x))
        return sigmoid * (beta_end - beta_start) + beta_start
    raise invalid("beta_schedule", "one of " + ", ".join(map(repr, BETA_SCHEDULES)), beta_schedule, ConfigError)


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` on float32 CPU: accumulates in float64, rounds each output to float32."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1), in float32 like Diffusers."""
    sqrt_bar = np.sqrt(cumprod_f32(np.float32(1.0) - betas))
    first, last = sqrt_bar[0], sqrt_bar[-1]
    sqrt_bar = (sqrt_bar - last) * (first / (first - last))
    bar = sqrt_bar * sqrt_bar
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return np.float32(1.0) - alphas


def alphas_cumprod_from_config(
    config: Mapping[str, Any], schedules: Sequence[str] = BETA_SCHEDULES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(betas, alphas, alphas_cumprod) for a config with the standard beta keys; validates ``beta_schedule``
    against ``schedules`` (the ones the scheduler's Diffusers counterpart accepts)."""
    if config.get("trained_betas") is None:
        check_choice("beta_schedule", config["beta_schedule"], schedules)
    betas = make_betas(config["beta_schedule"], config["beta_start"], config["beta_end"],
                       config["num_train_timesteps"], config.get("trained_betas"))
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    alphas = np.float32(1.0) - betas
    return betas, alphas, cumprod_f32(alphas)


# ------------------------------------------------------------------------------------------------ timestep spacing
def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending float64 timesteps by Lin et al. 2023, Table 2. ``linspace`` is left unrounded: integer
    schedulers round it, sigma schedulers interpolate at it."""
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
    if spacing == "trailing":
        stride = num_train_timesteps / num_steps  # a float here: trailing keeps the fractional ratio
        return np.arange(num_train_timesteps, 0, -stride).round() - 1
    raise invalid("timestep_spacing", "one of " + ", ".join(map(repr, TIMESTEP_SPACINGS)), spacing, ConfigError)


# -------------------------------------------------------------------------------------------------- sigma schedules
def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Training sigmas sqrt((1 - a) / a), ascending with t, float32."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: interpolate linearly in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Evenly spaced in log sigma (k-diffusion's ``get_sigmas_exponential``)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """Lee et al. 2024, "Beta Sampling is All You Need": sigmas at Beta(alpha, beta) quantiles."""
    quantiles = [betaincinv(alpha, beta, q) for q in 1 - np.linspace(0, 1, num_steps)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes 6.4, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b
    return math.exp(log_front) * _betacf(a, b, x) / a


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return result


def betaincinv(a: float, b: float, q: float) -> float:
    """Inverse of ``betainc`` in x (scipy.stats.beta.ppf without scipy): bisection to a bracket, then Newton
    steps on I_x - q with the beta density as derivative, kept inside the bracket."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    x = 0.5
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    for _ in range(200):
        f = betainc(a, b, x) - q
        if f == 0.0:
            return x
        lo, hi = (x, hi) if f < 0 else (lo, x)
        density = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        step = x - f / density
        x_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-17 + 2e-16 * x or hi - lo <= 2e-16 * hi:
            return x_new
        x = x_new
    return x


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray, *, float32_indices: bool = False) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log sigma (Diffusers'
    ``_sigma_to_t``, vectorised; the dtypes of the inputs decide the arithmetic exactly as there).
    ``float32_indices``: weight float32 copies of the indices, as torch does when Diffusers passes float32 tensors
    (KDPM2's interpolated timesteps); NumPy would promote float32 x int64 to float64."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    if float32_indices:
        low_idx, high_idx = low_idx.astype(np.float32), high_idx.astype(np.float32)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def resolve_sigma_range(config: Mapping[str, Any], in_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max) for karras / exponential / beta schedules: the config's ``sigma_min`` /
    ``sigma_max`` where the scheduler has them and they are set, else the ends of ``in_sigmas`` (descending)."""
    sigma_min = config.get("sigma_min")
    sigma_max = config.get("sigma_max")
    sigma_min = float(in_sigmas[-1]) if sigma_min is None else sigma_min
    sigma_max = float(in_sigmas[0]) if sigma_max is None else sigma_max
    return sigma_min, sigma_max


def sigma_schedule(config: Mapping[str, Any], in_sigmas: np.ndarray, num_steps: int) -> np.ndarray:
    """Apply the config's ``use_karras_sigmas`` / ``use_exponential_sigmas`` / ``use_beta_sigmas`` to the
    descending ``in_sigmas`` (float64 result); returns ``in_sigmas`` unchanged when none is set."""
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if not flags:
        return in_sigmas
    sigma_min, sigma_max = resolve_sigma_range(config, in_sigmas)
    if flags[0] == "use_karras_sigmas":
        return karras_sigmas(sigma_min, sigma_max, num_steps)
    if flags[0] == "use_exponential_sigmas":
        return exponential_sigmas(sigma_min, sigma_max, num_steps)
    return beta_sigmas(sigma_min, sigma_max, num_steps)


def check_sigma_flags(config: Mapping[str, Any]) -> None:
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if len(flags) > 1:
        raise invalid("use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas", "at most one True",
                      flags, ConfigError)


# ------------------------------------------------------------------------------------------------- parameterisation
def alpha_space_x0(
    model_output: np.ndarray, sample: np.ndarray, alpha_prod_t: np.float32, prediction_type: str
) -> np.ndarray:
    """x0 alone (see ``alpha_space_x0_eps``), for updates that do not need eps."""
    alpha = np.float32(alpha_prod_t)
    if prediction_type == "epsilon":
        return (sample - np.sqrt(np.float32(1) - alpha) * model_output) / np.sqrt(alpha)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return np.sqrt(alpha) * sample - np.sqrt(np.float32(1) - alpha) * model_output
    raise invalid("prediction_type", "one of " + ", ".join(map(repr, PREDICTION_TYPES)), prediction_type, ConfigError)


def alpha_space_x0_eps(
    model_output: np.ndarray, sample: np.ndarray, alpha_prod_t: np.float32, prediction_type: str
) -> tuple[np.ndarray, np.ndarray]:
    """(x0, eps) from a model output at a noise level with cumulative alpha ``alpha_prod_t`` (DDPM / DDIM form:
    x_t = sqrt(a) x0 + sqrt(1 - a) eps)."""
    alpha = np.float32(alpha_prod_t)
    sqrt_a, sqrt_b = np.sqrt(alpha), np.sqrt(np.float32(1) - alpha)
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_b
    if prediction_type == "v_prediction":
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
    raise invalid("prediction_type", "one of " + ", ".join(map(repr, PREDICTION_TYPES)), prediction_type, ConfigError)


def sigma_space_x0(
    model_output: np.ndarray, sample: np.ndarray, sigma: np.float32, prediction_type: str
) -> np.ndarray:
    """x0 from a model output in the k-diffusion form x = x0 + sigma * eps (Karras et al. 2022, Table 1 for v)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        scale = sigma * sigma + np.float32(1)
        return model_output * (-sigma / np.sqrt(scale)) + sample / scale
    if prediction_type == "sample":
        return model_output
    raise invalid("prediction_type", "one of " + ", ".join(map(repr, PREDICTION_TYPES)), prediction_type, ConfigError)


def dynamic_threshold(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per batch item, clamp to the ``ratio``
    quantile of |x0| (at least 1, at most ``max_value``) and rescale into [-1, 1]."""
    batch = sample.shape[0]
    flat = sample.reshape(batch, -1).astype(np.float32, copy=False)
    s = np.quantile(np.abs(flat), ratio, axis=1).astype(np.float32)
    s = np.clip(s, 1, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype, copy=False)


def draw_noise(shape: Sequence[int], generator: Any, dtype: Any = np.float32) -> np.ndarray:
    """Gaussian noise through ``diffrt.rng`` (torch-seed compatible), the only source schedulers use."""
    from ..rng import randn  # here, not at import time: rng is only needed by stochastic steps

    return randn(tuple(shape), generator=generator, dtype=dtype)


def add_noise_alpha(
    alphas_cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray, timesteps: Any
) -> np.ndarray:
    """Forward process at integer timesteps: sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPM/DDIM/LCM ``add_noise``)."""
    t = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    a = alphas_cumprod[t].astype(original.dtype)
    shape = (-1,) + (1,) * (original.ndim - 1)
    sqrt_a = np.sqrt(a).reshape(shape)
    sqrt_b = np.sqrt(np.asarray(1, original.dtype) - a).reshape(shape)
    return sqrt_a * original + sqrt_b * noise
