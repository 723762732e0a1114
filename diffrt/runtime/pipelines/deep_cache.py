"""DeepCache in the denoising loop (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free").

With `deep_cache_interval=N` (N >= 2) a call runs the full UNet at steps 0, N, 2N, ... and keeps the feature it
outputs (`deep_cache_feature`: the hidden state of the UNet's up path at the package's skip branch, see
`diffrt.export.deep_cache`); the steps between run `unet_shallow`, which recomputes only the shallow skip
connections and takes that feature in place of everything deeper. The feature has the UNet's batch (doubled under
classifier-free guidance), so both halves of a CFG batch keep their own. Each call has its own `DeepCacheRun`: calls
running at once on one pipeline share no cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from diffrt.errors import InputError, invalid
from diffrt.package.names import DEEP_CACHE_FEATURE, UNET_SHALLOW
from diffrt.package.reader import ModelPackage

if TYPE_CHECKING:
    from diffrt.runtime.pipelines.base import DiffusionPipeline

ALLOWED = "None or an int >= 1 (1 or None: off; N >= 2: the full UNet every N steps, the shallow UNet between)"


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


def is_full_step(step: int, interval: int) -> bool:
    """DeepCache's uniform schedule: the full UNet at steps 0, N, 2N, ..."""
    return step % interval == 0


@dataclass
class DeepCacheRun:
    """One call's cache: its schedule and the feature of its last full UNet run."""

    interval: int
    steps: int
    feature: np.ndarray | None = None

    def full(self, step: int) -> bool:
        return is_full_step(step, self.interval) or self.feature is None

    def _last_run(self, full: bool) -> int:
        """The call's last step that runs the full (or the shallow) UNet, -1 if none does."""
        return next((i for i in reversed(range(self.steps)) if is_full_step(i, self.interval) == full), -1)

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
