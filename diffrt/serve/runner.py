"""One batch of requests through one pipeline call, off the event loop (a worker thread).

The requests of a batch share their UNet calls: their prompts, negative prompts and seeds become lists (one
generator per image, Diffusers' convention), so each image is exactly what its request would make alone. The
step callback reports progress and stops the loop early: `interrupt` (A1111) keeps what the steps so far made, a
batch whose clients all went away is dropped.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from diffrt.runtime.generation import infotext_fields, prompt_chunk_count, scheduler_for, weighting_kwargs
from diffrt.runtime.image import postprocess
from diffrt.runtime.image_files import encode_image
from diffrt.runtime.infotext import format_infotext
from diffrt.serve.jobs import GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised by the step callback; `latents` are the batch's latents after the last finished step."""

    def __init__(self, latents: np.ndarray) -> None:
        super().__init__("interrupted")
        self.latents = latents


class Abandoned(Exception):
    """Every request of the batch was cancelled (timed out or its client went away): nobody wants the images."""


@dataclass
class BatchControl:
    """Shared between the event loop and the worker thread: flags in, progress out."""

    abandoned: Callable[[], bool] = lambda: False
    interrupt: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def callback(self, pipe: Any, i: int, t: Any, values: dict[str, Any]) -> dict[str, Any]:
        self.step = i + 1
        if self.abandoned():
            raise Abandoned()
        if self.interrupt.is_set():
            raise Interrupted(values["latents"])
        return {}


class PipelineSet:
    """One package's pipelines: the text-to-image one loaded once, the image-to-image / inpainting ones and the
    scheduler variants made from it with `from_pipe` (same engines, no reload), kept for reuse."""

    def __init__(self, pipe: Any, model: str, prompt_weighting: str | None = None) -> None:
        self.base = pipe
        self.model = model
        self.prompt_weighting = prompt_weighting
        self._variants: dict[tuple[str, str | None, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()

    def prompt_chunks(self, request: GenerationRequest) -> int:
        """The request's prompt chunk count (InputError when its prompt is longer than the package takes)."""
        return prompt_chunk_count(self.base, [*request.prompts, *request.negative_prompts], self.prompt_weighting)

    def get(self, task: str, scheduler: str | None, controlnets: tuple[str, ...] = ()) -> Any:
        """The `task` pipeline with `scheduler`, running the package's ControlNets `controlnets` (none: plain)."""
        from diffrt.runtime.pipelines.auto import plain_variant
        from diffrt.runtime.pipelines.base import pipe_as
        from diffrt.runtime.pipelines.registry import pipeline_class_for_task

        key = (task, scheduler, controlnets)
        with self._lock:
            if key not in self._variants:
                overrides: dict[str, Any] = {} if scheduler is None else {
                    "scheduler": scheduler_for(self.base.package.scheduler_config, scheduler)}
                if controlnets:
                    target = pipeline_class_for_task(task, self.base.package.pipeline_class)
                    variant = pipe_as(target, self.base, {**overrides, "controlnet": list(controlnets)})
                else:
                    variant = plain_variant(task, self.base, **overrides)
                variant.set_progress_bar_config(disable=True)
                self._variants[key] = variant
            return self._variants[key]

    def release(self) -> None:
        """Let go of every engine of these pipelines (an evicted LoRA set): the memory goes with the last user."""
        with self._lock:
            for variant in self._variants.values():
                variant.release_engines()
            self._variants.clear()
        self.base.release_engines()


def run_batch(pipes: PipelineSet, requests: Sequence[GenerationRequest], control: BatchControl) -> list[
        GenerationResult]:
    """Generate every request of the batch in one call; results in the order of `requests`."""
    first = requests[0]
    units = first.controlnet
    pipe = pipes.get(first.task, first.scheduler, tuple(units["names"]) if units else ())
    kwargs: dict[str, Any] = {
        "prompt": [p for r in requests for p in r.prompts],
        "negative_prompt": [p for r in requests for p in r.negative_prompts],
        "generator": [s for r in requests for s in r.seeds],
        "num_inference_steps": first.steps, "guidance_scale": first.guidance,
        "callback_on_step_end": control.callback,
        **weighting_kwargs(pipe, pipes.prompt_weighting),
    }
    if first.task == "text2image":
        kwargs.update(height=first.height, width=first.width)
    else:
        kwargs.update(image=first.image, strength=first.strength)
        if first.mask is not None:
            kwargs["mask_image"] = first.mask
    if first.deep_cache:
        kwargs["deep_cache_interval"] = first.deep_cache
    if units:  # one request per batch (its own control images)
        images = units["images"] if len(units["images"]) > 1 else units["images"][0]
        kwargs["image" if first.task == "text2image" else "control_image"] = images
        kwargs.update(controlnet_conditioning_scale=_one_or_list(units["scales"]),
                      control_guidance_start=_one_or_list(units["starts"]),
                      control_guidance_end=_one_or_list(units["ends"]), guess_mode=units["guess_mode"])
    control.steps = first.steps
    interrupted = False
    try:
        output = pipe(**kwargs)
        images, timings = output.images, output.timings
    except Interrupted as stop:  # A1111: an interrupted job returns what it has, decoded
        images, timings, interrupted = postprocess(pipe.decode(stop.latents)), {}, True
    return _split(pipe, pipes.model, requests, images, timings, interrupted)


def _one_or_list(values: list[float]) -> float | list[float]:
    return values[0] if len(values) == 1 else values


def _split(pipe: Any, model: str, requests: Sequence[GenerationRequest], images: list[Any],
           timings: dict[str, float], interrupted: bool) -> list[GenerationResult]:
    results, start = [], 0
    for request in requests:
        mine = images[start:start + request.rows]
        start += request.rows
        pngs, infotexts = [], []
        for index, image in enumerate(mine):
            fields = infotext_fields(pipe, pipe.scheduler, steps=request.steps, guidance=request.guidance,
                                     seed=request.seeds[index], width=image.width, height=image.height, model=model,
                                     strength=request.strength if request.task != "text2image" else None)
            shown = (request.shown_prompts or request.prompts)[index]  # as sent: A1111 keeps <lora:...> tags
            text = format_infotext(shown, request.negative_prompts[index], {**fields, **request.extra_fields})
            record = {"package": request.package, "task": request.task, "seed": request.seeds[index],
                      "scheduler": type(pipe.scheduler).__name__, "interrupted": interrupted,
                      "loras": [{"name": use.name, "text_encoder_scale": use.text_encoder_scale,
                                 "unet_scale": use.unet_scale} for use in request.loras],
                      "deep_cache_interval": request.deep_cache,
                      "deep_cache_schedule": pipe.deep_cache_schedule if request.deep_cache else None}
            pngs.append(encode_image(image, "PNG", text, record))
            infotexts.append(text)
        results.append(GenerationResult(pngs, list(request.seeds), infotexts, dict(timings),
                                        sum(r.rows for r in requests), interrupted))
    return results

