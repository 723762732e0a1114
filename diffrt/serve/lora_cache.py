"""Per-request LoRAs: a small LRU of adapted pipelines per package, keyed by the exact LoRA set and weights.

LoRA state lives on a pipeline object (and `from_pipe` variants share it), so requests with other LoRAs cannot use
the served pipeline: each LoRA set gets its own pipeline opened from the package, with the LoRAs loaded and set
through Diffusers' API (`load_lora_weights`, `set_adapters`) exactly as `diffrt generate --lora` does, so the same
request makes the same image. Its engines are created with the adapted weights once; popular sets stay built, the
least recently used is evicted (its engines released) when `capacity` is reached.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from diffrt.errors import ConfigError, InputError
from diffrt.serve.jobs import LoraUse, ServeError
from diffrt.serve.metrics import Metrics
from diffrt.serve.runner import PipelineSet

logger = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
LoraKey = tuple[LoraUse, ...]


class AdaptedPipelines:
    """`get(loras)` -> the `PipelineSet` of a pipeline with `loras` applied, built by `open_pipeline()` on first
    use and kept while among the `capacity` most recently used (0: built for each batch, kept by none)."""

    def __init__(self, package: str, open_pipeline: Callable[[], Any], capacity: int, metrics: Metrics,
                 prompt_weighting: str | None) -> None:
        self.package = package
        self.open_pipeline = open_pipeline
        self.capacity = capacity
        self.metrics = metrics
        self.prompt_weighting = prompt_weighting
        self._cache: collections.OrderedDict[LoraKey, PipelineSet] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, loras: LoraKey) -> PipelineSet:
        with self._lock:
            found = self._cache.get(loras)
            if found is not None:
                self._cache.move_to_end(loras)
                self.metrics.lora_cache_hits.labels(self.package).inc()
                return found
        pipes = self._build(loras)
        if self.capacity == 0:
            return pipes  # freed with the batch
        with self._lock:
            self._cache[loras] = pipes
            while len(self._cache) > self.capacity:
                _, evicted = self._cache.popitem(last=False)
                evicted.release()
                self.metrics.lora_evictions.labels(self.package).inc()
            self.metrics.lora_cached.labels(self.package).set(len(self._cache))
        return pipes

    def cached(self) -> list[LoraKey]:
        """The LoRA sets kept, least recently used first."""
        with self._lock:
            return list(self._cache)

    def release(self) -> None:
        with self._lock:
            for pipes in self._cache.values():
                pipes.release()
            self._cache.clear()

    def _build(self, loras: LoraKey) -> PipelineSet:
        start = time.perf_counter()
        pipe = self.open_pipeline()
        pipe.set_progress_bar_config(disable=True)
        names = []
        for use in loras:
            try:
                pipe.load_lora_weights(use.path, adapter_name=use.name)
            except (InputError, ConfigError) as error:  # another model family, LoHa, a provider without adapters
                raise ServeError(400, f"`{use.param}`: the LoRA {use.name!r} cannot be applied to "
                                 f"{self.package!r}: {error}", param=use.param, code="lora_not_applicable") from None
            names.append(use.name)
        pipe.set_adapters(names, [_weight(use) for use in loras])
        pipe.load_engines()  # now, not in the first batch's stage timings
        self.metrics.lora_builds.labels(self.package).inc()
        logger.info("built %s with %s in %.2f s", self.package,
                    ", ".join(f"{u.name}:{u.text_encoder_scale:g}:{u.unet_scale:g}" for u in loras),
                    time.perf_counter() - start)
        return PipelineSet(pipe, self.package, self.prompt_weighting)


def _weight(use: LoraUse) -> float | dict[str, float]:
    """One number when both multipliers agree (what `diffrt generate --lora PATH:SCALE` passes), else Diffusers'
    per-component weights: A1111's text-encoder multiplier for every text encoder, its UNet one for the UNet."""
    if use.text_encoder_scale == use.unet_scale:
        return use.unet_scale
    return {**{name: use.text_encoder_scale for name in TEXT_ENCODERS}, "unet": use.unet_scale}
