"""Inpainting (SD and SDXL): 9-channel inpaint UNets, and the legacy blend for 4-channel UNets.

`deep_cache_interval` runs DeepCache on a package exported with it (`diffrt.runtime.pipelines.deep_cache`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from diffrt.runtime.image import preprocess_image, preprocess_mask
from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.base import DenoiseState, DiffusionPipeline, PipelineOutput, randn_tensor, to_generator
from diffrt.runtime.pipelines.stable_diffusion import (
    _StableDiffusionBase,
    check_image_batch,
    requested_steps,
    strength_timesteps,
    tile_batch,
)
from diffrt.runtime.pipelines.stable_diffusion_xl import (
    _StableDiffusionXLBase,
    denoising_fraction,
    image_to_image_timesteps,
)
from diffrt.schedulers.protocol import Scheduler


@dataclass
class InpaintLatents:
    latents: np.ndarray
    noise: np.ndarray
    image_latents: np.ndarray | None
    mask: np.ndarray  # latent-resolution mask, batch-sized (not CFG-doubled)
    masked_image_latents: np.ndarray


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """torch's `interpolate(mode="nearest")` to latent size: source index floor(i * in / out)."""
    h, w = mask.shape[-2] // factor, mask.shape[-1] // factor
    rows = np.floor(np.arange(h) * (mask.shape[-2] / h)).astype(int)
    cols = np.floor(np.arange(w) * (mask.shape[-1] / w)).astype(int)
    return mask[:, :, rows][:, :, :, cols]


class _InpaintMixin(DiffusionPipeline):
    """The image/mask half of Diffusers' inpaint pipelines, shared by SD and SDXL."""

    def _inputs(self, image: Any, mask_image: Any, height: int, width: int,
                batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and mask at the call's size, with the package's VAE scale factor; each batch must divide the
        call's batch (Diffusers' rule), and errors name the argument (`image` or `mask_image`)."""
        if image is None or mask_image is None:
            raise checks.InputError("inpainting needs both `image` and `mask_image`")
        factor = self.vae_scale_factor
        pixels = preprocess_image(image, height, width, vae_scale_factor=factor, name="image")
        mask = preprocess_mask(mask_image, height, width, vae_scale_factor=factor, name="mask_image")
        check_image_batch("image", pixels.shape[0], batch)
        check_image_batch("mask_image", mask.shape[0], batch)
        if mask.shape[0] != pixels.shape[0] and pixels.shape[0] != 1 and mask.shape[0] != 1:
            raise checks.InputError(
                f"`mask_image` has a batch of {mask.shape[0]} and `image` one of {pixels.shape[0]}: pass one mask, "
                "or one per image"
            )
        return pixels, mask

    def _inpaint_latents(
        self, pixels: np.ndarray, mask: np.ndarray, batch: int, generator: Any, first_t: np.ndarray,
        scheduler: Scheduler, strength: float, latents: Any, add_noise: bool = True,
    ) -> InpaintLatents:
        """Diffusers' draw order: image latents (if needed), noise, then the masked image's latents."""
        channels = self.unet_config.get("in_channels", 4)
        shape = (batch, 4, pixels.shape[-2] // self.vae_scale_factor, pixels.shape[-1] // self.vae_scale_factor)
        is_strength_max = strength == 1.0
        image_latents = None
        if channels == 4 or (latents is None and not is_strength_max) or not add_noise:
            image_latents = self.scale_latents(self.encode_image(pixels, generator))
            image_latents = tile_batch(image_latents, batch, "image")
        if latents is None and add_noise:
            noise = randn_tensor(shape, generator)
            if is_strength_max:
                latents = noise
            else:  # encoded above: strength < 1 starts from the noised image
                latents = scheduler.add_noise(checks.present(image_latents, "image"), noise, first_t)
            if is_strength_max:
                latents = latents * np.float32(scheduler.init_noise_sigma)
        elif add_noise:
            noise = np.asarray(latents, np.float32)
            latents = noise * np.float32(scheduler.init_noise_sigma)
        else:
            noise, latents = randn_tensor(shape, generator), image_latents
        masked_image = pixels * (mask < 0.5)
        masked_latents = tile_batch(self.scale_latents(self.encode_image(masked_image, generator)), batch,
                                    "mask_image" if mask.shape[0] > pixels.shape[0] else "image")
        small_mask = tile_batch(downsample_mask(mask, self.vae_scale_factor), batch, "mask_image")
        return InpaintLatents(latents.astype(np.float32), noise, image_latents, small_mask, masked_latents)

    def _inpaint_state(
        self, inp: InpaintLatents, state: DenoiseState, scheduler: Scheduler, timesteps: np.ndarray
    ) -> DenoiseState:
        if self.unet_config.get("in_channels", 4) == 9:
            extra = np.concatenate([inp.mask, inp.masked_image_latents], axis=1)
            state.extra_channels = np.concatenate([extra, extra]) if state.do_cfg else extra
            return state

        def blend(latents: np.ndarray, i: int) -> np.ndarray:
            # Legacy inpainting: put the known region back, noised to the next step's level.
            known = checks.present(inp.image_latents, "image")  # a 4-channel UNet always encodes the image
            if i < len(timesteps) - 1:
                known = scheduler.add_noise(known, inp.noise, np.asarray([timesteps[i + 1]]))
            return ((1 - inp.mask) * known + inp.mask * latents).astype(np.float32)

        state.blend = blend
        return state


class StableDiffusionInpaintPipeline(_InpaintMixin, _StableDiffusionBase):
    required_components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        deep_cache_interval: int | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs.
        height = height or self.default_size()
        width = width or self.default_size()
        checks.check_range("strength", strength, 0.0, 1.0)
        self._check_common(height, width, dict(locals(), guidance_rescale=0.0))
        prompts, batch_size = self._batch_size(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
        checks.check_generator_count(generator, batch)
        do_cfg = guidance_scale > 1.0 and self.unet_config.get("time_cond_proj_dim") is None
        self._check_fits(height, width, batch_size, num_images_per_prompt, do_cfg, encodes=True)
        checks.check_latents(latents, (batch, 4, height // self.vae_scale_factor, width // self.vae_scale_factor))
        pixels, mask = self._inputs(image, mask_image, height, width, batch)
        generator = to_generator(generator)
        # 2. Timesteps cut to `strength`.
        scheduler, steps = self._schedule(num_inference_steps, timesteps, sigmas)
        custom = timesteps is not None or sigmas is not None
        steps = strength_timesteps(scheduler, steps, strength, requested_steps(num_inference_steps, custom, steps))
        if len(steps) == 0:
            raise checks.InputError(f"`strength`={strength} leaves no denoising step; raise it or the step count")
        # 3. Encode the prompt.
        with self._stage(timings, "text_encoder"):
            embeds = self._encode(prompts, batch_size, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                  do_cfg, clip_skip, num_images_per_prompt, prompt_weighting)
        # 4. Latents, mask and masked-image latents.
        with self._stage(timings, "vae_encode"):
            inp = self._inpaint_latents(pixels, mask, batch, generator, np.repeat(steps[:1], batch), scheduler,
                                        strength, latents)
        # 5. Denoise.
        feeds = {"encoder_hidden_states": embeds, **self._timestep_cond(guidance_scale, batch)}
        state = DenoiseState(feeds, guidance_scale, do_cfg, 0.0, self.step_kwargs(scheduler, generator, eta),
                             deep_cache_interval=deep_cache_interval)
        state = self._inpaint_state(inp, state, scheduler, steps)
        out, _ = self.denoise(scheduler, inp.latents, steps, state, callback_on_step_end,
                              callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(out, output_type, return_dict, timings)


class StableDiffusionXLInpaintPipeline(_InpaintMixin, _StableDiffusionXLBase):
    required_components = ("text_encoder_2", "unet", "vae_decoder", "vae_encoder")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        mask_image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        deep_cache_interval: int | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        kw = dict(locals())
        # 1. Check inputs.
        height = height or self.default_size()
        width = width or self.default_size()
        checks.check_range("strength", strength, 0.0, 1.0)
        prompts, batch_size, batch, do_cfg = self._prepare(prompt, kw, height, width, encodes=True)
        checks.check_latents(latents, (batch, 4, height // self.vae_scale_factor, width // self.vae_scale_factor))
        pixels, mask = self._inputs(image, mask_image, height, width, batch)
        generator = to_generator(generator)
        # 2. Timesteps: from denoising_start or cut to `strength`, then optionally cut at denoising_end.
        scheduler = self.fresh_scheduler()
        steps = image_to_image_timesteps(self, scheduler, num_inference_steps, timesteps, sigmas, strength,
                                         denoising_start, denoising_end)
        start = denoising_fraction(denoising_start)
        # 3. Encode prompts.
        with self._stage(timings, "text_encoder"):
            emb = self._encode_xl(prompts, batch_size, kw, do_cfg)
        # 4. Latents, mask and masked-image latents.
        with self._stage(timings, "vae_encode"):
            inp = self._inpaint_latents(pixels, mask, batch, generator, np.repeat(steps[:1], batch), scheduler,
                                        strength if start is None else 0.0, latents, add_noise=start is None)
        feeds = self._conditioning(emb, self._time_ids(kw, height, width), num_images_per_prompt, batch, do_cfg)
        feeds.update(self._timestep_cond(guidance_scale, batch))
        # 5. Denoise.
        state = DenoiseState(feeds, guidance_scale, do_cfg, guidance_rescale,
                             self.step_kwargs(scheduler, generator, eta), deep_cache_interval=deep_cache_interval)
        state = self._inpaint_state(inp, state, scheduler, steps)
        out, _ = self.denoise(scheduler, inp.latents, steps, state, callback_on_step_end,
                              callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(out, output_type, return_dict, timings)
