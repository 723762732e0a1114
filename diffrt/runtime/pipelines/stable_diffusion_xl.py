"""Stable Diffusion XL pipelines: base text-to-image and image-to-image (the refiner).

Besides Diffusers' arguments: `prompt_weighting`, and `deep_cache_interval` (DeepCache on a package exported with
it, see `diffrt.runtime.pipelines.deep_cache`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.base import DenoiseState, PipelineOutput, randn_tensor, to_generator
from diffrt.runtime.pipelines.prompts import (
    SdxlEmbeddings,
    as_prompt_list,
    encode_sdxl,
    encode_sdxl_negatives,
    negative_list,
    repeat_per_prompt,
)
from diffrt.runtime.pipelines.stable_diffusion import (
    _StableDiffusionBase,
    check_image_batch,
    image_or_latents,
    image_size,
    requested_steps,
    strength_timesteps,
    tile_batch,
)
from diffrt.runtime.pipelines.weighted_prompts import chunk_count, encode_sdxl_weighted
from diffrt.schedulers.protocol import Scheduler


def denoising_fraction(value: Any) -> float | None:
    """Diffusers only honours denoising_start/end when they are floats strictly inside (0, 1)."""
    return value if isinstance(value, float) and 0.0 < value < 1.0 else None


def cut_denoising_end(timesteps: np.ndarray, denoising_end: float | None, num_train_timesteps: int) -> np.ndarray:
    if denoising_end is None:
        return timesteps
    cutoff = int(round(num_train_timesteps - denoising_end * num_train_timesteps))
    return timesteps[: int(np.sum(timesteps >= cutoff))]


def image_to_image_timesteps(pipe: Any, scheduler: Scheduler, num_inference_steps: int, timesteps: Any, sigmas: Any,
                             strength: float, denoising_start: Any, denoising_end: Any) -> np.ndarray:
    """The SDXL image-to-image / inpainting schedule: from `denoising_start` (the refiner half of a base + refiner
    ensemble) or cut to `strength`, then optionally cut at `denoising_end`; InputError when no step is left."""
    steps = pipe.set_timesteps(scheduler, num_inference_steps, timesteps, sigmas)
    start = denoising_fraction(denoising_start)
    if start is None:
        custom = timesteps is not None or sigmas is not None
        steps = strength_timesteps(scheduler, steps, strength, requested_steps(num_inference_steps, custom, steps))
    else:
        steps = _start_at(scheduler, steps, start)
    steps = cut_denoising_end(steps, denoising_fraction(denoising_end), scheduler.config.num_train_timesteps)
    if len(steps) == 0:
        raise checks.InputError(f"`strength`={strength} leaves no denoising step; raise it or the step count")
    return steps


class _StableDiffusionXLBase(_StableDiffusionBase):
    required_components: tuple[str, ...] = ("text_encoder_2", "unet", "vae_decoder")
    optional_components: tuple[str, ...] = ("text_encoder",)  # the refiner has only the second one
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    component_names: tuple[str, ...] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet",
                                        "scheduler")
    _callback_tensor_inputs: tuple[str, ...] = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")

    @property
    def _force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.package.index.get("force_zeros_for_empty_prompt", True))

    @property
    def _requires_aesthetics_score(self) -> bool:
        return bool(self.package.index.get("requires_aesthetics_score", False))

    def _encoders(self) -> list:
        encoders = []
        if self.has_component("text_encoder"):
            encoders.append(self.prompt_encoder("text_encoder", "tokenizer"))
        encoders.append(self.prompt_encoder("text_encoder_2", "tokenizer_2"))
        return encoders

    def _given_embeds(self, kw: dict[str, Any], batch_size: int) -> SdxlEmbeddings:
        """The embeddings the caller passed, checked against the shapes the UNet takes."""
        pooled_trailing = self.limits.embeds_shape("text_embeds", self._pooled_width())

        def pooled(name: str, batch: int | None) -> np.ndarray | None:
            return checks.check_embeds(name, kw[name], batch, pooled_trailing)

        def sequence(name: str, batch: int | None) -> np.ndarray | None:
            return None if kw[name] is None else self._prompt_embeds(name, kw[name], batch)

        given = SdxlEmbeddings(sequence("prompt_embeds", None), pooled("pooled_prompt_embeds", None),
                               sequence("negative_prompt_embeds", batch_size),
                               pooled("negative_pooled_prompt_embeds", batch_size))
        checks.check_same_shape("negative_prompt_embeds", given.negative_prompt_embeds, "prompt_embeds",
                                given.prompt_embeds)
        checks.check_same_shape("negative_pooled_prompt_embeds", given.negative_pooled, "pooled_prompt_embeds",
                                given.pooled)
        return given

    def _pooled_width(self) -> int | None:
        """SDXL's UNet takes the pooled embedding and 5 or 6 size ids, each embedded to addition_time_embed_dim."""
        total = self.unet_config.get("projection_class_embeddings_input_dim")
        per_id = self.unet_config.get("addition_time_embed_dim")
        if not isinstance(total, int) or not isinstance(per_id, int):
            return None
        return total - (5 if self._requires_aesthetics_score else 6) * per_id

    def _encode_xl(self, prompts: list[str] | None, batch_size: int, kw: dict[str, Any],
                   do_cfg: bool) -> SdxlEmbeddings:
        given = self._given_embeds(kw, batch_size)
        if given.prompt_embeds is not None and given.pooled is None:
            raise checks.InputError("`pooled_prompt_embeds` is required together with `prompt_embeds`")
        need_negative = do_cfg and given.negative_prompt_embeds is None
        zero_negative = need_negative and kw["negative_prompt"] is None and self._force_zeros_for_empty_prompt
        if given.prompt_embeds is not None and not (need_negative and not zero_negative):
            result = given
            if zero_negative:
                result.negative_prompt_embeds = np.zeros_like(given.prompt_embeds)
                result.negative_pooled = np.zeros_like(given.pooled)
            return result
        encoders = self._encoders()
        negatives = None
        if need_negative and not zero_negative:
            negative = negative_list(kw["negative_prompt"], batch_size, "negative_prompt")
            second = kw["negative_prompt_2"] or kw["negative_prompt"]
            negative_2 = negative_list(second, batch_size, "negative_prompt_2")
            negatives = [negative, negative_2][-len(encoders):]
        weighted = kw.get("prompt_weighting") is not None
        if given.prompt_embeds is not None:  # user embeds with an explicit negative prompt to encode
            if negatives is not None and weighted:
                chunks = chunk_count(given.prompt_embeds, "prompt_embeds")
                _, _, given.negative_prompt_embeds, given.negative_pooled = encode_sdxl_weighted(
                    encoders, None, negatives, None, self.max_prompt_chunks(), chunks)
            elif negatives is not None:
                given.negative_prompt_embeds, given.negative_pooled = encode_sdxl_negatives(encoders, negatives)
            return given
        if prompts is None:
            raise checks.InputError("one of `prompt` or `prompt_embeds` is required")
        prompts_2 = as_prompt_list(kw["prompt_2"], "prompt_2") or prompts
        per_encoder = [prompts, prompts_2][-len(encoders):]
        if not weighted:
            return encode_sdxl(encoders, per_encoder, negatives, kw["clip_skip"], zero_negative)
        result = SdxlEmbeddings(*encode_sdxl_weighted(encoders, per_encoder, negatives, kw["clip_skip"],
                                                      self.max_prompt_chunks()))
        if zero_negative:
            result.negative_prompt_embeds = np.zeros_like(result.prompt_embeds)
            result.negative_pooled = np.zeros_like(result.pooled)
        return result

    def _time_ids(self, kw: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        original = tuple(kw.get("original_size") or (height, width))
        target = tuple(kw.get("target_size") or (height, width))
        crops = tuple(kw.get("crops_coords_top_left", (0, 0)))
        neg_original = tuple(kw.get("negative_original_size") or original)
        neg_target = tuple(kw.get("negative_target_size") or target)
        if self._requires_aesthetics_score:
            neg_crops = tuple(kw.get("negative_crops_coords_top_left", (0, 0)))
            ids = original + crops + (kw.get("aesthetic_score", 6.0),)
            neg = neg_original + neg_crops + (kw.get("negative_aesthetic_score", 2.5),)
        else:
            ids = original + crops + target
            # Diffusers uses the positive crop coordinates for the negative ids here; we match it.
            neg = neg_original + crops + neg_target
        return np.asarray([ids], np.float32), np.asarray([neg], np.float32)

    def _conditioning(
        self, emb: SdxlEmbeddings, time_ids: tuple[np.ndarray, np.ndarray], n: int, batch: int, do_cfg: bool
    ) -> dict[str, np.ndarray]:
        embeds = repeat_per_prompt(checks.present(emb.prompt_embeds, "prompt_embeds"), n)
        pooled = repeat_per_prompt(checks.present(emb.pooled, "pooled_prompt_embeds"), n)
        ids, neg_ids = time_ids
        if do_cfg:
            negative = checks.present(emb.negative_prompt_embeds, "negative_prompt_embeds")
            negative_pooled = checks.present(emb.negative_pooled, "negative_pooled_prompt_embeds")
            checks.check_same_shape("negative_prompt_embeds", negative, "prompt_embeds", emb.prompt_embeds)
            embeds = np.concatenate([repeat_per_prompt(negative, n), embeds])
            pooled = np.concatenate([repeat_per_prompt(negative_pooled, n), pooled])
            ids = np.concatenate([neg_ids, ids])
        ids = np.tile(ids, (batch, 1))
        return {"encoder_hidden_states": embeds.astype(np.float32), "text_embeds": pooled.astype(np.float32),
                "time_ids": ids}

    def _prepare(self, prompt: Any, kw: dict[str, Any], height: int, width: int,
                 encodes: bool = False, source: str | None = None) -> tuple[Any, ...]:
        self._check_common(height, width, kw)
        for name in ("denoising_start", "denoising_end"):
            checks.check_optional_fraction(name, kw.get(name))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            checks.check_finite(name, kw.get(name))
        for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                     "negative_crops_coords_top_left", "negative_target_size"):
            checks.check_size_pair(name, kw.get(name))
        prompts, batch_size = self._batch_size(prompt, kw["prompt_embeds"])
        batch = batch_size * kw["num_images_per_prompt"]
        checks.check_generator_count(kw["generator"], batch)
        do_cfg = kw["guidance_scale"] > 1.0 and self.unet_config.get("time_cond_proj_dim") is None
        self._check_fits(height, width, batch_size, kw["num_images_per_prompt"], do_cfg, encodes, source)
        self._given_embeds(kw, batch_size)
        return prompts, batch_size, batch, do_cfg

    def encode_prompt(  # type: ignore[override]
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
        prompt_weighting: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """Diffusers' SDXL `encode_prompt`: (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds), each repeated `num_images_per_prompt` times per prompt; the negatives are
        None without classifier-free guidance (unless passed). `device` is accepted and ignored."""
        if lora_scale is not None:
            raise checks.invalid("lora_scale", "None (a LoRA's text-encoder weight is part of its session: "
                                 "set_adapters(names, adapter_weights={\"text_encoder\": w}))", lora_scale)
        checks.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        checks.check_clip_skip(clip_skip)
        checks.check_prompt_weighting(prompt_weighting)
        kw = dict(locals())
        prompts, batch_size = self._batch_size(prompt, prompt_embeds)
        emb = self._encode_xl(prompts, batch_size, kw, do_classifier_free_guidance)
        n = num_images_per_prompt

        def repeat(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else repeat_per_prompt(array, n).astype(np.float32, copy=False)

        embeds = checks.present(repeat(emb.prompt_embeds), "prompt_embeds")
        pooled = checks.present(repeat(emb.pooled), "pooled_prompt_embeds")
        return embeds, repeat(emb.negative_prompt_embeds), pooled, repeat(emb.negative_pooled)


class StableDiffusionXLPipeline(_StableDiffusionXLBase):
    """SDXL text-to-image with Diffusers' arguments (prompt_2, size/crop conditioning, denoising_end)."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
        deep_cache_interval: int | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        kw = dict(locals())
        # 1. Check inputs.
        height = height or self.default_size()
        width = width or self.default_size()
        prompts, batch_size, batch, do_cfg = self._prepare(prompt, kw, height, width)
        shape = (batch, self.unet_config.get("out_channels", 4), height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        checks.check_latents(latents, shape)
        generator = to_generator(generator)
        # 2. Timesteps, optionally cut at denoising_end (the base half of a base + refiner ensemble).
        scheduler, steps = self._schedule(num_inference_steps, timesteps, sigmas)
        steps = cut_denoising_end(steps, denoising_fraction(denoising_end), scheduler.config.num_train_timesteps)
        # 3. Encode prompts (both encoders) and the size conditioning.
        with self._stage(timings, "text_encoder"):
            emb = self._encode_xl(prompts, batch_size, kw, do_cfg)
        feeds = self._conditioning(emb, self._time_ids(kw, height, width), num_images_per_prompt, batch, do_cfg)
        # 4. Initial latents.
        latents = self.prepare_latents(shape, generator, latents, scheduler)
        # 5. Denoise.
        feeds.update(self._timestep_cond(guidance_scale, batch))
        state = DenoiseState(feeds, guidance_scale, do_cfg, guidance_rescale,
                             self.step_kwargs(scheduler, generator, eta), deep_cache_interval=deep_cache_interval)
        latents, _ = self.denoise(scheduler, latents, steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(latents, output_type, return_dict, timings)


class StableDiffusionXLImg2ImgPipeline(_StableDiffusionXLBase):
    """SDXL image-to-image and the refiner (aesthetic-score conditioning, denoising_start)."""

    required_components = ("text_encoder_2", "unet", "vae_decoder", "vae_encoder")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: Any = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: Sequence[int] | None = None,
        sigmas: Sequence[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Any = None,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt_weighting: str | None = None,
        deep_cache_interval: int | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        kw = dict(locals(), latents=None)
        # 1. Check inputs.
        checks.check_range("strength", strength, 0.0, 1.0)
        height, width = image_size(image, self.vae_scale_factor)
        prompts, batch_size, batch, do_cfg = self._prepare(prompt, kw, height, width, encodes=True, source="image")
        pixels = image_or_latents(image, self.vae_scale_factor)
        check_image_batch("image", pixels.shape[0], batch)
        generator = to_generator(generator)
        # 2. Timesteps: from denoising_start (refiner half of an ensemble) or cut to `strength`.
        scheduler = self.fresh_scheduler()
        steps = image_to_image_timesteps(self, scheduler, num_inference_steps, timesteps, sigmas, strength,
                                         denoising_start, denoising_end)
        start = denoising_fraction(denoising_start)
        # 3. Encode prompts.
        with self._stage(timings, "text_encoder"):
            emb = self._encode_xl(prompts, batch_size, kw, do_cfg)
        # 4. Latents: encode the image, noise it unless it continues a base model's partial denoise.
        with self._stage(timings, "vae_encode"):
            latents = self._image_latents(pixels, batch, generator)
        if start is None:
            latents = scheduler.add_noise(latents, randn_tensor(latents.shape, generator), np.repeat(steps[:1], batch))
        feeds = self._conditioning(emb, self._time_ids(kw, height, width), num_images_per_prompt, batch, do_cfg)
        feeds.update(self._timestep_cond(guidance_scale, batch))
        # 5. Denoise.
        state = DenoiseState(feeds, guidance_scale, do_cfg, guidance_rescale,
                             self.step_kwargs(scheduler, generator, eta), deep_cache_interval=deep_cache_interval)
        latents, _ = self.denoise(scheduler, latents.astype(np.float32), steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        # 6. Decode.
        return self._finish(latents, output_type, return_dict, timings)

    def _image_latents(self, pixels: np.ndarray, batch: int, generator: Any) -> np.ndarray:
        if pixels.shape[1] == 4:
            return tile_batch(pixels, batch, "image")
        if isinstance(generator, list) and pixels.shape[0] < batch:
            pixels = tile_batch(pixels, batch, "image")
        return tile_batch(self.scale_latents(self.encode_image(pixels, generator)), batch, "image")


def _start_at(scheduler: Scheduler, timesteps: np.ndarray, denoising_start: float) -> np.ndarray:
    """Diffusers' `get_timesteps` with denoising_start: continue where the base model stopped."""
    train = scheduler.config.num_train_timesteps
    cutoff = int(round(train - (denoising_start * train)))
    num_steps = int(np.sum(timesteps < cutoff))
    if scheduler.order == 2 and num_steps % 2 == 0:
        # A second-order scheduler's step pairs must not be split: start one earlier (Diffusers' rule).
        num_steps += 1
    t_start = len(timesteps) - num_steps
    scheduler.set_begin_index(t_start)
    return timesteps[t_start:]
