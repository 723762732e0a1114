"""DeepCache in the denoising loop (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free").

With `deep_cache_interval=N` (N >= 2) a call runs the full UNet at steps 0, N, 2N, ... and keeps the feature it
outputs (`deep_cache_feature`: the hidden state of the UNet's up path at the package's skip branch, see
`diffrt.export.deep_cache`); the steps between run `unet_shallow`, which recomputes only the shallow skip
connections and takes that feature in place of everything deeper. The feature has the UNet's batch (doubled under
classifier-free guidance), so both halves of a CFG batch keep their own. Each call has its own `DeepCacheRun`: calls
running at once on one pipeline share no cache.

Which steps run the full UNet is the pipeline's `deep_cache_schedule`: "uniform" (steps 0, N, 2N, ..., as
DeepCache's `DeepCacheSDHelper` does) or "nonuniform" (as many full runs, densest at the start: the paper's
non-uniform 1:N strategy, which places them where the deep features change fastest; `full_steps`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from diffrt.errors import InputError, invalid
from diffrt.package.names import DEEP_CACHE_FEATURE, UNET_SHALLOW
from diffrt.package.reader import ModelPackage

if TYPE_CHECKING:
    from diffrt.runtime.pipelines.base import DiffusionPipeline

ALLOWED = "None or an int >= 1 (1 or None: off; N >= 2: the full UNet every N steps, the shallow UNet between)"
#: `deep_cache_schedule` values: which steps of a call run the full UNet
SCHEDULES = ("uniform", "nonuniform")
#: the non-uniform schedule's exponent: full step j of k is at round((steps - N) * (j / (k - 1)) ** power). Of 1.0
#: (uniform spacing), 1.5, 2.0 and 2.5 on the digits model (20 steps, OpenVINO bf16 against fp32), 1.5 was best at
#: interval 3 (36.6 dB against the uniform 34.7) and within 0.4 dB of the best at interval 2 (41.8 against 39.7)
NONUNIFORM_POWER = 1.5


def check_interval(value: Any, package: ModelPackage) -> int | None:
    """The call's `deep_cache_interval` as an int >= 2, or None when off; InputError naming it for a value that is
    not an int >= 1, or for a package exported without DeepCache."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise invalid("deep_cache_interval", ALLOWED, value)
    if value == 1:
        return None
    if package.deep_cache_branch is None:
        raise InputError(f"`deep_cache_interval` needs a package exported with DeepCache, and {package.root} has no "
                         f"`{UNET_SHALLOW}`: export it with `diffrt export SOURCE OUTPUT --deep-cache` "
                         "(`export_pipeline(..., deep_cache=True)`), or pass deep_cache_interval=None")
    return int(value)


def check_schedule(value: Any) -> str:
    """`deep_cache_schedule`, or InputError naming it and the allowed values."""
    if not isinstance(value, str) or value not in SCHEDULES:
        raise invalid("deep_cache_schedule", " or ".join(repr(name) for name in SCHEDULES), value)
    return value


def full_steps(steps: int, interval: int, schedule: str = "uniform") -> frozenset[int]:
    """The steps of a `steps`-step call that run the full UNet: ceil(steps / interval) of them, step 0 first.
    "uniform": 0, N, 2N, ...; "nonuniform": the same count, spaced by `NONUNIFORM_POWER` from step 0 to step
    steps - N (the last full run leaves N - 1 shallow steps after it, as the uniform schedule's last one can)."""
    count = math.ceil(steps / interval)
    if schedule == "uniform" or count < 2:
        return frozenset(range(0, steps, interval))
    last = steps - interval
    chosen = {round(last * (j / (count - 1)) ** NONUNIFORM_POWER) for j in range(count)}
    free = (step for step in range(steps) if step not in chosen)
    while len(chosen) < count:  # rounding put two runs on one early step: the earliest free steps take them
        chosen.add(next(free))
    return frozenset(chosen)


@dataclass
class DeepCacheRun:
    """One call's cache: its schedule and the feature of its last full UNet run."""

    interval: int
    steps: int
    schedule: str = "uniform"
    feature: np.ndarray | None = None
    _full: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._full = full_steps(self.steps, self.interval, self.schedule)

    def full(self, step: int) -> bool:
        return step in self._full or self.feature is None

    def _last_run(self, full: bool) -> int:
        """The call's last step that runs the full (or the shallow) UNet, -1 if none does."""
        return next((i for i in reversed(range(self.steps)) if (i in self._full) == full), -1)

    def run(self, pipe: "DiffusionPipeline", step: int, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """This step's noise prediction; each engine hands its working memory back after its last run of the call
        (when the pipeline releases memory at all)."""
        full = self.full(step)
        release = pipe.release_memory and step == self._last_run(full)
        if full:
            out = pipe.unet_outputs(feeds, release)
            # read-only and owning its data: a GPU engine keeps it on the device across the shallow steps
            self.feature = np.array(out[DEEP_CACHE_FEATURE], copy=True)
            self.feature.flags.writeable = False
        else:
            assert self.feature is not None  # `full` is True until a full run has kept one
            out = pipe.unet_outputs({**feeds, DEEP_CACHE_FEATURE: self.feature}, release, UNET_SHALLOW)
        return out["out_sample"]
