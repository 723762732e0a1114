"""int8 calibration from the pipeline's own UNet inputs (issue #19).

With `inference_precision="int8"` (OpenVINO), the UNet is quantized with activation ranges measured on real UNet
feeds: a float copy of the pipeline (bf16 where the CPU has it) makes a few short text-to-image calls and records
every UNet call's feeds, as optimum-intel records its UNet inputs. The other components (text encoders, VAE: they run
once per image) keep the float precision. The quantized UNet is cached, so this runs once per package.
"""
from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from diffrt.errors import ConfigError
from diffrt.runtime.engines.base import Engine, TensorSpec
from diffrt.runtime.engines.int8 import Calibration

if TYPE_CHECKING:
    from diffrt.runtime.pipelines.base import DiffusionPipeline

logger = logging.getLogger(__name__)

#: varied subjects and styles, so the activation ranges are not those of one picture
PROMPTS = ("a photograph of a busy city street at night, neon signs, rain",
           "an oil painting of a mountain lake at sunrise, a small wooden boat")
STEPS = 4
GUIDANCE_SCALE = 7.5
#: the components whose engines are quantized; the others run at the float precision
QUANTIZED = ("unet",)


def engine_options(pipe: "DiffusionPipeline", name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The engine options of component `name` when the pipeline asks for int8: calibration for the UNet, the float
    precision ("auto": bf16 where the CPU has it) for the rest. Other options pass through unchanged."""
    if options.get("inference_precision") != "int8":
        return options
    if name not in QUANTIZED:
        return {**options, "inference_precision": "auto"}
    return {**options, "calibration": unet_calibration(pipe)}


def unet_calibration(pipe: "DiffusionPipeline") -> Calibration:
    """The UNet's calibration: `STEPS`-step calls of each of `PROMPTS` at the package's default size, seeds 0, 1, ..."""
    from diffrt.runtime.pipelines.registry import pipeline_class_for_task, plain_class_for

    class_name = plain_class_for(pipe.package.pipeline_class)
    if "Inpaint" in class_name:
        raise ConfigError("`inference_precision` 'int8' calibrates on text-to-image calls, which an inpainting "
                          "package's UNet cannot make; use 'bf16' or 'fp32' for it")
    size = pipe.default_size()
    scheduler = type(pipe.scheduler).__name__
    key = json.dumps({"prompts": PROMPTS, "steps": STEPS, "guidance": GUIDANCE_SCALE, "size": size,
                      "scheduler": scheduler}, sort_keys=True)

    def feeds() -> list[Mapping[str, np.ndarray]]:
        target = pipeline_class_for_task("text2image", class_name)
        options = {**pipe.engine_options, "inference_precision": "auto"}
        helper = target(pipe.package, provider=pipe.provider, scheduler=pipe.scheduler,
                        component_options=pipe.component_options, **options)
        helper.set_progress_bar_config(disable=True)
        recorder = FeedRecorder(helper.engine("unet"))
        helper._engines["unet"] = recorder  # the helper is private to this function
        logger.info("int8: recording the UNet's feeds of %d %d-step calls at %dx%d (%s)", len(PROMPTS), STEPS, size,
                    size, scheduler)
        for seed, prompt in enumerate(PROMPTS):
            helper(prompt, height=size, width=size, num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE,
                   generator=seed, output_type="latent")
        return recorder.feeds

    return Calibration(key, feeds)


class FeedRecorder:
    """An engine that runs another and keeps a copy of every call's feeds."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.feeds: list[Mapping[str, np.ndarray]] = []

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.engine.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.engine.outputs

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value) for name, value in feeds.items()})
        return self.engine.run(feeds, release_memory=release_memory)

    def close(self) -> None:
        self.engine.close()
