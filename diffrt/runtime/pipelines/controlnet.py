"""ControlNet pipelines for SD 1.x / 2.x: text-to-image, image-to-image and inpainting (Diffusers' classes).

Each is its plain counterpart plus the ControlNet step (`diffrt.runtime.pipelines.control`): the call checks its
ControlNet arguments and prepares the control images first, then runs the plain pipeline, whose denoising loop
asks the ControlNets for the UNet's residuals at every step. The ControlNets a pipeline runs are the package's
(`controlnet_<name>` components), all of them by default or those named by `from_pretrained(..., controlnet=
"pose")` / `controlnet=["pose", "depth"]` (multi-ControlNet, in that order).
"""
from __future__ import annotations

import contextvars
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from diffrt.errors import invalid
from diffrt.package.names import CONTROLNET_PREFIX
from diffrt.runtime.pipelines.base import DiffusionPipeline
from diffrt.runtime.pipelines.components import EngineComponent
from diffrt.runtime.pipelines.control import (
    ControlArguments,
    ControlStep,
    check_control_arguments,
    check_controlnet_selection,
    control_size,
    keep_schedule,
    prepare_images,
    tile_control_images,
)
from diffrt.runtime.pipelines.inpaint import StableDiffusionInpaintPipeline
from diffrt.runtime.pipelines.stable_diffusion import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    image_size,
)

# Arguments the ControlNet classes take on top of their plain counterparts (not passed on to them).
CONTROL_KEYS = ("self", "__class__", "control_image", "controlnet_conditioning_scale", "guess_mode",
                "control_guidance_start", "control_guidance_end")


@dataclass(frozen=True)
class _PendingControl:
    """A call's checked ControlNet arguments and control images, until its denoising loop starts."""

    args: ControlArguments
    images: list[np.ndarray]


# The call in progress on this thread (or task): calls on one pipeline from several threads each see their own.
_PENDING: contextvars.ContextVar[_PendingControl | None] = contextvars.ContextVar("diffrt_controlnet", default=None)


class ControlNetMixin(DiffusionPipeline):
    """The ControlNet half of a ControlNet pipeline: which ControlNets it runs, and the per-step residuals."""

    controlnet: EngineComponent | list[EngineComponent]

    def __init__(self, package: Any, *args: Any, controlnet: str | list[str] | None = None, **kwargs: Any) -> None:
        available = [name[len(CONTROLNET_PREFIX):] for name in package.components
                     if name.startswith(CONTROLNET_PREFIX)]
        self.controlnet_names = check_controlnet_selection(available, controlnet)
        super().__init__(package, *args, **kwargs)
        views = [EngineComponent(self, CONTROLNET_PREFIX + name) for name in self.controlnet_names]
        # Diffusers: a ControlNetModel for one, a MultiControlNetModel (a list of nets here) for several
        self.controlnet = views[0] if len(views) == 1 else views

    def engine_names(self) -> list[str]:
        return super().engine_names() + [CONTROLNET_PREFIX + name for name in self.controlnet_names]

    def check_deep_cache(self, deep_cache_interval: Any) -> int | None:
        """DeepCache does not run with ControlNets (nor does the export combine them)."""
        if deep_cache_interval is not None and deep_cache_interval != 1:
            raise invalid("deep_cache_interval", "None or 1 with ControlNets: they add residuals to every skip "
                          "connection and the mid block at every step, which DeepCache's cached features would drop",
                          deep_cache_interval)
        return None

    def warmup(self, height: int | None = None, width: int | None = None, batch_size: int = 1,
               **call_arguments: Any) -> float:
        """`DiffusionPipeline.warmup`, with a gray control image per ControlNet unless given."""
        key = "control_image" if "control_image" in inspect.signature(self.__call__).parameters else "image"
        gray = np.full((1, height or self.default_size(), width or self.default_size(), 3), 0.5, np.float32)
        call_arguments.setdefault(key, gray if len(self.controlnet_names) == 1 else [gray] * len(self.controlnet_names))
        return super().warmup(height, width, batch_size, **call_arguments)

    def _global_pool(self) -> list[bool]:
        return [bool(self.package.component(CONTROLNET_PREFIX + name).config.get("global_pool_conditions"))
                for name in self.controlnet_names]

    def _control_arguments(self, image: Any, scale: Any, start: Any, end: Any, guess_mode: Any,
                           image_name: str) -> ControlArguments:
        args = check_control_arguments(image, len(self.controlnet_names), scale, start, end, guess_mode, image_name)
        # Diffusers: a globally pooled ControlNet (shuffle) always runs in guess mode
        guess = args.guess_mode or self._global_pool()[0]
        return ControlArguments(args.images, args.scales, args.starts, args.ends, guess)

    def _prepare_control(self, args: ControlArguments, height: int, width: int, prompt: Any, prompt_embeds: Any,
                         image_name: str) -> _PendingControl:
        """Size checks first (a huge control image is refused before it is resized), then the control images."""
        self.limits.check_size(height, width, self.vae_components, False, None)
        prompt_batch = self._batch_size(prompt, prompt_embeds)[1]  # type: ignore[attr-defined]
        images = prepare_images(args, height, width, self.vae_scale_factor, prompt_batch, image_name)
        return _PendingControl(args, images)

    @contextmanager
    def _controlled(self, pending: _PendingControl) -> Iterator[None]:
        token = _PENDING.set(pending)
        try:
            yield
        finally:
            _PENDING.reset(token)

    def denoise(self, scheduler: Any, latents: np.ndarray, timesteps: np.ndarray, state: Any, *args: Any,
                **kwargs: Any) -> Any:
        pending = _PENDING.get()
        if pending is not None:
            images = tile_control_images(pending.images, latents.shape[0], state.do_cfg, pending.args.guess_mode)
            state.controlnet = ControlStep(self, [CONTROLNET_PREFIX + n for n in self.controlnet_names],
                                           pending.args, images, keep_schedule(pending.args, len(timesteps)),
                                           state.do_cfg, self._global_pool())
        return super().denoise(scheduler, latents, timesteps, state, *args, **kwargs)


def inherit_signature(function: Any, parent: Any) -> None:
    """Give `function(..., **kwargs)` the signature it really has: its own parameters, then the plain pipeline's
    (keyword-only), so `inspect.signature` (warmup, the CLI's defaults, docs) sees every argument and default."""
    ours, theirs = inspect.signature(function), inspect.signature(parent)
    params = [p for p in ours.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in theirs.parameters.values()
               if p.name not in names and p.name not in CONTROL_KEYS
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    function.__signature__ = ours.replace(parameters=params)


def plain_arguments(arguments: Mapping[str, Any], *also: str) -> dict[str, Any]:
    """A ControlNet `__call__`'s arguments (its locals() on entry) without the ControlNet ones (and `also`): what
    its plain counterpart takes."""
    return {key: value for key, value in arguments.items() if key not in CONTROL_KEYS + also}


class StableDiffusionControlNetPipeline(ControlNetMixin, StableDiffusionPipeline):
    """Text-to-image steered by the control `image` (or a list, one per ControlNet); the size defaults to the
    (first) control image's."""

    def __call__(self, prompt: Any = None, image: Any = None, height: int | None = None,  # type: ignore[override]
                 width: int | None = None, num_inference_steps: int = 50, timesteps: Any = None, sigmas: Any = None,
                 guidance_scale: float = 7.5, negative_prompt: Any = None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, generator: Any = None, latents: np.ndarray | None = None,
                 prompt_embeds: np.ndarray | None = None, negative_prompt_embeds: np.ndarray | None = None,
                 output_type: str = "pil", return_dict: bool = True, controlnet_conditioning_scale: Any = 1.0,
                 guess_mode: bool = False, control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0,
                 clip_skip: int | None = None, prompt_weighting: str | None = None, callback_on_step_end: Any = None,
                 callback_on_step_end_tensor_inputs: Any = ("latents",)) -> Any:
        call = plain_arguments(locals(), "image")  # here `image` is the control image
        args = self._control_arguments(image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, "image")
        if height is None or width is None:
            default_height, default_width = control_size(image, self.vae_scale_factor)
            call.update(height=height or default_height, width=width or default_width)
        pending = self._prepare_control(args, call["height"], call["width"], prompt, prompt_embeds, "image")
        with self._controlled(pending):
            return super().__call__(**call)


class StableDiffusionControlNetImg2ImgPipeline(ControlNetMixin, StableDiffusionImg2ImgPipeline):
    """Image-to-image steered by `control_image`, resized to the `image`'s size."""

    def __call__(self, prompt: Any = None, image: Any = None, control_image: Any = None,  # type: ignore[override]
                 strength: float = 0.8, num_inference_steps: int = 50, timesteps: Any = None, sigmas: Any = None,
                 guidance_scale: float = 7.5, negative_prompt: Any = None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, generator: Any = None, prompt_embeds: np.ndarray | None = None,
                 negative_prompt_embeds: np.ndarray | None = None, output_type: str = "pil",
                 return_dict: bool = True, controlnet_conditioning_scale: Any = 0.8, guess_mode: bool = False,
                 control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0, clip_skip: int | None = None,
                 prompt_weighting: str | None = None, callback_on_step_end: Any = None,
                 callback_on_step_end_tensor_inputs: Any = ("latents",)) -> Any:
        call = plain_arguments(locals())
        args = self._control_arguments(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, "control_image")
        height, width = image_size(image, self.vae_scale_factor)
        pending = self._prepare_control(args, height, width, prompt, prompt_embeds, "control_image")
        with self._controlled(pending):
            return super().__call__(**call)


class StableDiffusionControlNetInpaintPipeline(ControlNetMixin, StableDiffusionInpaintPipeline):
    """Inpainting steered by `control_image`; the size defaults to the `image`'s (Diffusers' ControlNet inpaint)."""

    def __call__(self, prompt: Any = None, image: Any = None, mask_image: Any = None,  # type: ignore[override]
                 control_image: Any = None, height: int | None = None, width: int | None = None,
                 strength: float = 1.0, num_inference_steps: int = 50, timesteps: Any = None, sigmas: Any = None,
                 guidance_scale: float = 7.5, negative_prompt: Any = None, num_images_per_prompt: int = 1,
                 eta: float = 0.0, generator: Any = None, latents: np.ndarray | None = None,
                 prompt_embeds: np.ndarray | None = None, negative_prompt_embeds: np.ndarray | None = None,
                 output_type: str = "pil", return_dict: bool = True, controlnet_conditioning_scale: Any = 0.5,
                 guess_mode: bool = False, control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0,
                 clip_skip: int | None = None, prompt_weighting: str | None = None, callback_on_step_end: Any = None,
                 callback_on_step_end_tensor_inputs: Any = ("latents",)) -> Any:
        call = plain_arguments(locals())
        args = self._control_arguments(control_image, controlnet_conditioning_scale, control_guidance_start,
                                       control_guidance_end, guess_mode, "control_image")
        if height is None or width is None:
            default_height, default_width = image_size(image, self.vae_scale_factor)
            call.update(height=height or default_height, width=width or default_width)
        pending = self._prepare_control(args, call["height"], call["width"], prompt, prompt_embeds, "control_image")
        with self._controlled(pending):
            return super().__call__(**call)
