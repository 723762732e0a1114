"""Stable Diffusion 1.x / 2.x pipelines: text-to-image, image-to-image and latent-consistency (LCM).

Besides Diffusers' arguments: `prompt_weighting` (A1111 emphasis), and `deep_cache_interval` (text-to-image,
image-to-image: DeepCache on a package exported with it, see `diffrt.runtime.pipelines.deep_cache`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from diffrt.runtime.image import input_image_size, postprocess, preprocess_image
from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.base import DenoiseState, DiffusionPipeline, PipelineOutput, randn_tensor, to_generator
from diffrt.runtime.pipelines.guidance import guidance_scale_embedding
from diffrt.runtime.pipelines.prompts import as_prompt_list, encode_sd, negative_list, repeat_per_prompt
from diffrt.runtime.pipelines.weighted_prompts import encode_sd_weighted
from diffrt.schedulers.protocol import Scheduler

logger = logging.getLogger(__name__)


class _StableDiffusionBase(DiffusionPipeline):
    required_components: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")
    #: the text encoders a call runs, one batch row per prompt (checked against the package's batch range)
    text_encoder_names: tuple[str, ...] = ("text_encoder",)

    def _batch_size(self, prompt: Any, prompt_embeds: Any) -> tuple[list[str] | None, int]:
        prompts = as_prompt_list(prompt)
        if prompts is None and prompt_embeds is None:
            raise checks.InputError("pass `prompt` or `prompt_embeds`")
        if prompts is not None and prompt_embeds is not None:
            raise checks.InputError("pass only one of `prompt` and `prompt_embeds`")
        if prompts is not None:
            return prompts, len(prompts)
        return None, int(self._prompt_embeds("prompt_embeds", prompt_embeds).shape[0])

    def _prompt_embeds(self, name: str, embeds: Any, batch: int | None = None) -> np.ndarray:
        """User-given `prompt_embeds` / `negative_prompt_embeds`: (batch, sequence, width) as the UNet takes."""
        trailing = self.limits.embeds_shape("encoder_hidden_states", self.unet_config.get("cross_attention_dim"))
        return checks.present(checks.check_embeds(name, embeds, batch, trailing), name)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Diffusers' `encode_prompt`: (prompt_embeds, negative_prompt_embeds) as float32 arrays, each repeated
        `num_images_per_prompt` times per prompt; the negative is None without classifier-free guidance. `device`
        is accepted for Diffusers' signature and ignored (the engines' provider decides)."""
        if lora_scale is not None:
            raise checks.invalid("lora_scale", "None (a LoRA's text-encoder weight is part of its session: "
                                 "set_adapters(names, adapter_weights={\"text_encoder\": w}))", lora_scale)
        checks.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        checks.check_clip_skip(clip_skip)
        checks.check_prompt_weighting(prompt_weighting)
        prompts, batch_size = self._batch_size(prompt, prompt_embeds)
        embeds = None if prompt_embeds is None else self._prompt_embeds("prompt_embeds", prompt_embeds)
        negative = None
        if negative_prompt_embeds is not None:
            negative = self._prompt_embeds("negative_prompt_embeds", negative_prompt_embeds, batch_size)
            checks.check_same_shape("negative_prompt_embeds", negative, "prompt_embeds", embeds)
        negatives = None
        if do_classifier_free_guidance and negative is None:
            negatives = negative_list(negative_prompt, batch_size)
        if embeds is None or negatives is not None:
            encoder = self.prompt_encoder("text_encoder", "tokenizer")
            if prompt_weighting:
                embeds, encoded = encode_sd_weighted(encoder, prompts, negatives, embeds, clip_skip,
                                                     self.max_prompt_chunks())
                negative = encoded if negatives is not None else negative
            else:
                if embeds is None:
                    embeds, _ = encode_sd(encoder, prompts or [], None, clip_skip)
                if negatives is not None:
                    negative = encoder(negatives, max_length=embeds.shape[1]).last_hidden_state
        embeds = repeat_per_prompt(embeds, num_images_per_prompt).astype(np.float32, copy=False)
        if not do_classifier_free_guidance:
            return embeds, None
        negative = checks.present(negative, "negative_prompt_embeds")
        return embeds, repeat_per_prompt(negative, num_images_per_prompt).astype(np.float32, copy=False)

    def _encode(
        self,
        prompts: list[str] | None,
        batch_size: int,
        negative_prompt: Any,
        prompt_embeds: Any,
        negative_prompt_embeds: Any,
        do_cfg: bool,
        clip_skip: int | None,
        num_images_per_prompt: int,
        prompt_weighting: str | None = None,
    ) -> np.ndarray:
        """Prompt (and negative) embeddings, repeated per image and CFG-concatenated [negative; positive]."""
        embeds, negative = self.encode_prompt(prompts, None, num_images_per_prompt, do_cfg, negative_prompt,
                                              prompt_embeds, negative_prompt_embeds, clip_skip=clip_skip,
                                              prompt_weighting=prompt_weighting)
        if negative is None:
            return embeds
        return np.concatenate([negative, embeds]).astype(np.float32)

    def _timestep_cond(self, guidance_scale: float, batch: int) -> dict[str, np.ndarray]:
        dim = self.unet_config.get("time_cond_proj_dim")
        if dim is None:
            return {}
        w = np.full((batch,), guidance_scale - 1.0, dtype=np.float32)
        return {"timestep_cond": guidance_scale_embedding(w, dim)}

    def _check_common(self, height: int, width: int, kw: dict[str, Any]) -> None:
        checks.check_size(height, width, self.vae_scale_factor)
        checks.check_steps(kw["num_inference_steps"], kw["timesteps"], kw["sigmas"])
        checks.check_steps_fit(self.scheduler, kw["num_inference_steps"], kw["timesteps"], kw["sigmas"])
        checks.check_range("guidance_scale", kw["guidance_scale"], 0.0)
        checks.check_range("guidance_rescale", kw["guidance_rescale"], 0.0, 1.0)
        checks.check_range("eta", kw["eta"], 0.0)
        checks.check_positive_int("num_images_per_prompt", kw["num_images_per_prompt"])
        checks.check_output_type(kw["output_type"])
        checks.check_clip_skip(kw["clip_skip"])
        checks.check_prompt_weighting(kw.get("prompt_weighting"))
        checks.check_callback_inputs(kw["callback_on_step_end_tensor_inputs"], self._callback_tensor_inputs)
        self.check_deep_cache(kw.get("deep_cache_interval"))

    def _check_fits(self, height: int, width: int, batch_size: int, num_images_per_prompt: int, do_cfg: bool,
                    encodes: bool = False, source: str | None = None) -> None:
        """Size and batch against the package's ranges, before any prompt is encoded or noise allocated."""
        self.limits.check_size(height, width, self.vae_components, encodes, source)
        self.limits.check_batch(batch_size, num_images_per_prompt, do_cfg, self.vae_components, encodes,
                                [n for n in self.text_encoder_names if self.has_component(n)])

    def _schedule(self, num_inference_steps: int, timesteps: Any, sigmas: Any) -> tuple[Scheduler, np.ndarray]:
        """This call's own scheduler and its timesteps, set before the prompt is encoded so that a schedule the
        scheduler refuses fails before any engine runs."""
        scheduler = self.fresh_scheduler()
        return scheduler, self.set_timesteps(scheduler, num_inference_steps, timesteps, sigmas)

    def _finish(self, latents: np.ndarray, output_type: str, return_dict: bool, timings: dict[str, float]) -> Any:
        images: Any
        if output_type == "latent":
            images = latents
        else:
            with self._stage(timings, "vae_decode"):
                images = postprocess(self.decode(latents), output_type=output_type)
        return PipelineOutput(images, timings) if return_dict else (images, None)


class StableDiffusionPipeline(_StableDiffusionBase):
    """Text-to-image, `pipe(prompt, ...)` with Diffusers' arguments and defaults."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        deep_cache_interval: int | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs (all before any engine runs).
        height = height or self.default_size()
        width = width or self.default_size()
        self._check_common(height, width, locals())
        prompts, batch_size = self._batch_size(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
        shape = (batch, self.unet_config.get("out_channels", 4), height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        checks.check_generator_count(generator, batch)
        do_cfg = guidance_scale > 1.0 and self.unet_config.get("time_cond_proj_dim") is None
        self._check_fits(height, width, batch_size, num_images_per_prompt, do_cfg)
        checks.check_latents(latents, shape)
        generator = to_generator(generator)
        # 2. Timesteps, on this call's own scheduler.
        scheduler, steps = self._schedule(num_inference_steps, timesteps, sigmas)
        # 3. Encode the prompt.
        with self._stage(timings, "text_encoder"):
            embeds = self._encode(prompts, batch_size, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                  do_cfg, clip_skip, num_images_per_prompt, prompt_weighting)
        # 4. Initial latents.
        latents = self.prepare_latents(shape, generator, latents, scheduler)
        # 5. Denoise.
        feeds = {"encoder_hidden_states": embeds, **self._timestep_cond(guidance_scale, batch)}
        state = DenoiseState(feeds, guidance_scale, do_cfg, guidance_rescale,
                             self.step_kwargs(scheduler, generator, eta), deep_cache_interval=deep_cache_interval)
        latents, _ = self.denoise(scheduler, latents, steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(latents, output_type, return_dict, timings)


class StableDiffusionImg2ImgPipeline(_StableDiffusionBase):
    """Image-to-image: the input image is encoded, noised to `strength`, then denoised."""

    required_components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        deep_cache_interval: int | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs.
        checks.check_range("strength", strength, 0.0, 1.0)
        height, width = image_size(image, self.vae_scale_factor)
        self._check_common(height, width, dict(locals(), latents=None))
        prompts, batch_size = self._batch_size(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
        checks.check_generator_count(generator, batch)
        do_cfg = guidance_scale > 1.0 and self.unet_config.get("time_cond_proj_dim") is None
        self._check_fits(height, width, batch_size, num_images_per_prompt, do_cfg, encodes=True, source="image")
        pixels = image_or_latents(image, self.vae_scale_factor)
        check_image_batch("image", pixels.shape[0], batch)
        generator = to_generator(generator)
        # 2. Timesteps, cut to `strength`.
        scheduler, steps = self._schedule(num_inference_steps, timesteps, sigmas)
        custom = timesteps is not None or sigmas is not None
        steps = strength_timesteps(scheduler, steps, strength, requested_steps(num_inference_steps, custom, steps))
        if len(steps) == 0:
            raise checks.InputError(
                f"`strength`={strength} with {len(scheduler.timesteps)} steps leaves no denoising step; raise either"
            )
        # 3. Encode the prompt.
        with self._stage(timings, "text_encoder"):
            embeds = self._encode(prompts, batch_size, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                  do_cfg, clip_skip, num_images_per_prompt, prompt_weighting)
        # 4. Latents: encode (with the generator, as Diffusers does), then noise to the first timestep.
        with self._stage(timings, "vae_encode"):
            latents = self.image_latents(pixels, batch, generator, timings)
        noise = randn_tensor(latents.shape, generator)
        latents = scheduler.add_noise(latents, noise, np.repeat(steps[:1], batch))
        # 5. Denoise.
        feeds = {"encoder_hidden_states": embeds, **self._timestep_cond(guidance_scale, batch)}
        state = DenoiseState(feeds, guidance_scale, do_cfg, guidance_rescale,
                             self.step_kwargs(scheduler, generator, eta), deep_cache_interval=deep_cache_interval)
        latents, _ = self.denoise(scheduler, latents.astype(np.float32), steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(latents, output_type, return_dict, timings)

    def image_latents(self, pixels: np.ndarray, batch: int, generator: Any, timings: dict[str, float]) -> np.ndarray:
        if pixels.shape[1] == 4:  # already latents (e.g. a base model's output_type="latent")
            latents = pixels
        else:
            if isinstance(generator, list) and pixels.shape[0] < batch:
                pixels = tile_batch(pixels, batch, "image")
            latents = self.scale_latents(self.encode_image(pixels, generator))
        return tile_batch(latents, batch, "image")


class LatentConsistencyModelPipeline(_StableDiffusionBase):
    """LCM text-to-image: guidance is embedded (`timestep_cond`), no classifier-free guidance pass."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs.
        height = height or self.default_size()
        width = width or self.default_size()
        self._check_common(height, width, dict(locals(), sigmas=None, guidance_rescale=0.0, eta=0.0))
        prompts, batch_size = self._batch_size(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
        shape = (batch, self.unet_config.get("out_channels", 4), height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        checks.check_generator_count(generator, batch)
        self._check_fits(height, width, batch_size, num_images_per_prompt, False)
        checks.check_latents(latents, shape)
        generator = to_generator(generator)
        # 2. Timesteps.
        scheduler = self.fresh_scheduler()
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, original_inference_steps=original_inference_steps)
        else:
            scheduler.set_timesteps(num_inference_steps, original_inference_steps=original_inference_steps)
        steps = np.asarray(scheduler.timesteps)
        # 3. Encode the prompt (no negative: LCM does not run CFG).
        with self._stage(timings, "text_encoder"):
            embeds = self._encode(prompts, batch_size, None, prompt_embeds, None, False, clip_skip,
                                  num_images_per_prompt, prompt_weighting)
        # 4. Latents and the guidance embedding.
        latents = self.prepare_latents(shape, generator, latents, scheduler)
        feeds = {"encoder_hidden_states": embeds, **self._timestep_cond(guidance_scale, batch)}
        # 5. Denoise; LCM decodes the last predicted x0 ("denoised"), not the re-noised sample.
        state = DenoiseState(feeds, guidance_scale, False, 0.0, self.step_kwargs(scheduler, generator, 0.0))
        _, denoised = self.denoise(scheduler, latents, steps, state, callback_on_step_end,
                                   callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(checks.present(denoised, "the last denoised sample"), output_type, return_dict, timings)


def is_latents(image: Any) -> bool:
    return isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == 4


def image_size(image: Any, vae_scale_factor: int, name: str = "image") -> tuple[int, int]:
    """The (height, width) in pixels a call on `image` runs at, read before any conversion (a huge image is
    refused by the size limits before it is resized or encoded)."""
    if image is None:
        raise checks.InputError(f"`{name}` is required here")
    if is_latents(image):
        return image.shape[2] * vae_scale_factor, image.shape[3] * vae_scale_factor
    return input_image_size(image, vae_scale_factor, name)


def image_or_latents(image: Any, vae_scale_factor: int, name: str = "image") -> np.ndarray:
    """NCHW float32: 4-channel arrays are latents, anything else is an image preprocessed to [-1, 1]."""
    if is_latents(image):
        latents = image.astype(np.float32, copy=False)
        checks.check_finite_array(name, latents)
        return latents
    return preprocess_image(image, vae_scale_factor=vae_scale_factor, name=name)


def check_image_batch(name: str, rows: int, batch: int) -> None:
    """Diffusers' rule: an image (or mask) batch must divide the prompts x num_images_per_prompt batch."""
    if rows > batch or batch % rows:
        raise checks.InputError(
            f"`{name}` has a batch of {rows}, which does not divide the {batch} images of this call "
            "(prompts x num_images_per_prompt); pass one image, or one per image"
        )


def tile_batch(array: np.ndarray, batch: int, name: str) -> np.ndarray:
    """`torch.cat([x] * k)` as Diffusers does to match the prompt batch."""
    if array.shape[0] == batch:
        return array
    if batch % array.shape[0]:
        raise checks.InputError(f"`{name}` has batch {array.shape[0]}, which does not divide the batch of {batch}")
    return np.concatenate([array] * (batch // array.shape[0]), axis=0)


def requested_steps(num_inference_steps: int, custom: bool, timesteps: np.ndarray) -> int:
    """The step count Diffusers' `retrieve_timesteps` reports: the schedule's length for custom lists."""
    return len(timesteps) if custom else num_inference_steps


def strength_timesteps(scheduler: Scheduler, timesteps: np.ndarray, strength: float, num_steps: int) -> np.ndarray:
    """Diffusers' `get_timesteps`: keep the last `strength` fraction of the schedule, and tell the scheduler."""
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps[t_start * scheduler.order:]
