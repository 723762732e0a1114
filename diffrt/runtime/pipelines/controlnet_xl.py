"""ControlNet pipelines for SDXL: text-to-image and image-to-image (Diffusers' `StableDiffusionXLControlNet*`).

The SDXL ControlNet also takes the pooled text embedding and the size / crop time ids, from the same feeds the
UNet gets. Arguments beyond the ControlNet ones are the plain SDXL pipelines' (passed on by keyword).
"""
from __future__ import annotations

from typing import Any

from diffrt.runtime.pipelines.control import control_size
from diffrt.runtime.pipelines.controlnet import ControlNetMixin, inherit_signature, plain_arguments
from diffrt.runtime.pipelines.stable_diffusion import image_size
from diffrt.runtime.pipelines.stable_diffusion_xl import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline


class StableDiffusionXLControlNetPipeline(ControlNetMixin, StableDiffusionXLPipeline):
    """SDXL text-to-image steered by the control `image` (or a list, one per ControlNet); the size defaults to the
    (first) control image's."""

    def __call__(self, prompt: Any = None, prompt_2: Any = None, image: Any = None,  # type: ignore[override]
                 height: int | None = None, width: int | None = None, *, controlnet_conditioning_scale: Any = 1.0,
                 guess_mode: bool = False, control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0,
                 prompt_embeds: Any = None, **kwargs: Any) -> Any:
        call = {**plain_arguments(locals(), "image", "kwargs"), **kwargs}
        args = self._control_arguments(image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, "image")
        if height is None or width is None:
            default_height, default_width = control_size(image, self.vae_scale_factor)
            call.update(height=height or default_height, width=width or default_width)
        pending = self._prepare_control(args, call["height"], call["width"], prompt, prompt_embeds, "image")
        with self._controlled(pending):
            return super().__call__(**call)


class StableDiffusionXLControlNetImg2ImgPipeline(ControlNetMixin, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image steered by `control_image`, resized to the `image`'s size."""

    def __call__(self, prompt: Any = None, prompt_2: Any = None, image: Any = None,  # type: ignore[override]
                 control_image: Any = None, strength: float = 0.8, *, controlnet_conditioning_scale: Any = 0.8,
                 guess_mode: bool = False, control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0,
                 prompt_embeds: Any = None, **kwargs: Any) -> Any:
        call = {**plain_arguments(locals(), "kwargs"), **kwargs}
        args = self._control_arguments(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, "control_image")
        height, width = image_size(image, self.vae_scale_factor)
        pending = self._prepare_control(args, height, width, prompt, prompt_embeds, "control_image")
        with self._controlled(pending):
            return super().__call__(**call)


inherit_signature(StableDiffusionXLControlNetPipeline.__call__, StableDiffusionXLPipeline.__call__)
inherit_signature(StableDiffusionXLControlNetImg2ImgPipeline.__call__, StableDiffusionXLImg2ImgPipeline.__call__)
