"""FLUX.1 pipelines (dev: guidance-distilled; schnell: 4 steps, no guidance): text-to-image and image-to-image.

Diffusers' `FluxPipeline` arguments and defaults (28 steps, `guidance_scale` 3.5 embedded for dev, optional true
CFG with `true_cfg_scale` > 1 and a negative prompt, `max_sequence_length` 512, sigmas linspace(1, 1/n, n) shifted by
`mu` from the image's token count). The latents travel packed: 2x2 latent patches as 4*C channels per token
(`pack_latents`), with rotary ids row / column per token; they are unpacked before the VAE. True CFG runs the
negative and positive prompt as one transformer batch of 2 rows per image (Diffusers runs two calls; the
arithmetic is the same).
"""
from __future__ import annotations

import logging
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np

from diffrt.errors import InputError, invalid
from diffrt.runtime.image import preprocess_image
from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.base import DenoiseState, PipelineOutput, randn_tensor, to_generator
from diffrt.runtime.pipelines.flow_base import FlowTransformerPipeline, resolution_shift
from diffrt.runtime.pipelines.flow_prompts import FlowEmbeddings, encode_flux
from diffrt.runtime.pipelines.prompts import as_prompt_list, negative_list, repeat_per_prompt
from diffrt.runtime.pipelines.stable_diffusion import check_image_batch, requested_steps, tile_batch
from diffrt.runtime.tokenizer_t5 import T5Tokenizer

logger = logging.getLogger(__name__)


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: each 2x2 patch one token, channels outermost (Diffusers' order)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(batch, (height // 2) * (width // 2), channels * 4))


def unpack_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """`pack_latents`' inverse for latents `height` x `width` (latent pixels)."""
    batch, _, packed = latents.shape
    patches = latents.reshape(batch, height // 2, width // 2, packed // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(patches.reshape(batch, packed // 4, height, width))


def image_ids(rows: int, columns: int) -> np.ndarray:
    """Rotary positions of the packed tokens, [rows * columns, 3]: (0, row, column) per token, row-major."""
    ids = np.zeros((rows, columns, 3), np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(columns, dtype=np.float32)[None, :]
    return ids.reshape(rows * columns, 3)


class _FluxBase(FlowTransformerPipeline):
    required_components: tuple[str, ...] = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    component_names: tuple[str, ...] = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                        "transformer", "scheduler")

    @cached_property
    def tokenizer_2(self) -> T5Tokenizer | None:  # type: ignore[override]  # FLUX's second tokenizer is T5's
        return self._t5_tokenizer("tokenizer_2")

    @property
    def _latent_channels(self) -> int:
        return int(self.transformer_config.get("in_channels", 64)) // 4

    def denoiser_feeds(self, feeds: dict[str, np.ndarray], model_input: np.ndarray, t: Any) -> dict[str, np.ndarray]:
        # The transformer takes t / 1000 and scales it back (Diffusers' FluxPipeline); float32 as there.
        timestep = np.full((model_input.shape[0],), t, dtype=np.float32) / np.float32(1000)
        return dict(feeds, hidden_states=model_input, timestep=timestep)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        max_sequence_length: int = 512,
        lora_scale: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Diffusers' `encode_prompt`: (prompt_embeds, pooled_prompt_embeds, text_ids), repeated
        `num_images_per_prompt` times per prompt; `device` is accepted and ignored."""
        if lora_scale is not None:
            raise invalid("lora_scale", "None (diffrt has no LoRA for FLUX transformers)", lora_scale)
        checks.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        side = self._side(as_prompt_list(prompt), as_prompt_list(prompt_2, "prompt_2"), prompt_embeds,
                          pooled_prompt_embeds, "", max_sequence_length)
        embeds = repeat_per_prompt(side.prompt_embeds, num_images_per_prompt)
        return embeds, repeat_per_prompt(side.pooled, num_images_per_prompt), np.zeros((embeds.shape[1], 3),
                                                                                         np.float32)

    def _side(self, prompts: list[str] | None, prompts_2: list[str] | None, embeds: Any, pooled: Any, prefix: str,
              max_sequence_length: int, batch: int | None = None) -> FlowEmbeddings:
        joint, pooled_width = (self.transformer_config.get(key) for key in ("joint_attention_dim",
                                                                             "pooled_projection_dim"))
        given = checks.check_embeds(f"{prefix}prompt_embeds", embeds, batch,
                                    [None, (joint, joint) if isinstance(joint, int) else None])
        given_pooled = checks.check_embeds(f"{prefix}pooled_prompt_embeds", pooled, batch,
                                           [(pooled_width, pooled_width) if isinstance(pooled_width, int) else None])
        if given is not None:
            if given_pooled is None:
                raise InputError(f"`{prefix}pooled_prompt_embeds` is required together with `{prefix}prompt_embeds`")
            return FlowEmbeddings(given, given_pooled)
        if prompts is None:
            raise InputError(f"pass `{prefix}prompt` or `{prefix}prompt_embeds`")
        t5 = self.t5_encoder("text_encoder_2", "tokenizer_2")
        assert t5 is not None  # a required component
        return encode_flux(self.prompt_encoder("text_encoder", "tokenizer"), t5, prompts, prompts_2 or prompts,
                           max_sequence_length)

    def _check_call(self, height: int, width: int, kw: dict[str, Any], encodes: bool = False,
                    source: str | None = None) -> tuple[int, bool]:
        """Every argument, before any engine runs; returns (prompt batch, true classifier-free guidance)."""
        if kw.get("joint_attention_kwargs"):
            raise invalid("joint_attention_kwargs", "None (LoRA scales and IP-Adapters do not apply to an exported "
                          "FLUX transformer)", kw["joint_attention_kwargs"])
        checks.check_size(height, width, self.vae_scale_factor)
        checks.check_steps(kw["num_inference_steps"], None, kw["sigmas"])
        checks.check_range("guidance_scale", kw["guidance_scale"], 0.0)
        checks.check_range("true_cfg_scale", kw["true_cfg_scale"], 0.0)
        checks.check_positive_int("num_images_per_prompt", kw["num_images_per_prompt"])
        checks.check_output_type(kw["output_type"])
        checks.check_callback_inputs(kw["callback_on_step_end_tensor_inputs"], self._callback_tensor_inputs)
        prompts = as_prompt_list(kw["prompt"])
        for key in ("prompt_2", "negative_prompt", "negative_prompt_2"):
            as_prompt_list(kw[key], key)
        if prompts is None and kw["prompt_embeds"] is None:
            raise InputError("pass `prompt` or `prompt_embeds`")
        if prompts is not None and kw["prompt_embeds"] is not None:
            raise InputError("pass only one of `prompt` and `prompt_embeds`")
        batch = len(prompts) if prompts is not None else int(np.shape(kw["prompt_embeds"])[0])
        has_negative = kw["negative_prompt"] is not None or (
            kw["negative_prompt_embeds"] is not None and kw["negative_pooled_prompt_embeds"] is not None)
        do_cfg = kw["true_cfg_scale"] > 1 and has_negative
        self.check_sequence(kw["max_sequence_length"], ["text_encoder_2"], ("encoder_hidden_states", 1))
        self.check_vae_size(height, width, encodes, source)
        tokens = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        extent = self.limits.extent("transformer", "hidden_states", 1)
        if extent is not None and not extent[0] <= tokens <= extent[1]:
            raise invalid(source or "height", f"a size whose packed latent tokens (height/{2 * self.vae_scale_factor} "
                          f"x width/{2 * self.vae_scale_factor}) are in [{extent[0]}, {extent[1]}] for this package",
                          f"{height}x{width} ({tokens} tokens)")
        self.check_batch(batch, kw["num_images_per_prompt"], 2 if do_cfg else 1, self.text_encoder_names, encodes)
        checks.check_generator_count(kw["generator"], batch * kw["num_images_per_prompt"])
        return batch, do_cfg

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent sides, even so that they pack into 2x2 patches (Diffusers rounds the pixel size down)."""
        unit = self.vae_scale_factor * 2
        if height % unit or width % unit:
            logger.warning("`height` and `width` should be multiples of %d for FLUX; got %dx%d, the image is %dx%d",
                           unit, height, width, height - height % unit, width - width % unit)
        return 2 * (height // unit), 2 * (width // unit)

    def _conditioning(self, kw: dict[str, Any], do_cfg: bool, rows: int, latent_hw: tuple[int, int]) -> dict:
        """The transformer's feeds besides the latents and timestep, CFG-concatenated [negative; positive]."""
        count = kw["num_images_per_prompt"]
        embeds, pooled, text_ids = self.encode_prompt(kw["prompt"], kw["prompt_2"], None, count, kw["prompt_embeds"],
                                                      kw["pooled_prompt_embeds"], kw["max_sequence_length"])
        if do_cfg:
            # A string negative prompt serves every prompt of the batch (Diffusers would encode it once and fail
            # to pair one negative row with several images).
            batch = embeds.shape[0] // count
            negatives = [None if kw[key] is None else negative_list(kw[key], batch, key)
                         for key in ("negative_prompt", "negative_prompt_2")]
            negative = self._side(negatives[0], negatives[1], kw["negative_prompt_embeds"],
                                  kw["negative_pooled_prompt_embeds"], "negative_", kw["max_sequence_length"], batch)
            negative_embeds = repeat_per_prompt(negative.prompt_embeds, count)
            checks.check_same_shape("negative_prompt_embeds", negative_embeds, "prompt_embeds", embeds)
            embeds = np.concatenate([negative_embeds, embeds])
            pooled = np.concatenate([repeat_per_prompt(negative.pooled, count), pooled])
        feeds = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
                 "img_ids": image_ids(latent_hw[0] // 2, latent_hw[1] // 2)}
        if self.transformer_config.get("guidance_embeds"):
            feeds["guidance"] = np.full((rows * (2 if do_cfg else 1),), kw["guidance_scale"], np.float32)
        return feeds

    def _schedule(self, num_inference_steps: int, sigmas: Sequence[float] | None, mu: float | None,
                  tokens: int) -> tuple[Any, np.ndarray]:
        if sigmas is None:
            sigmas = list(np.linspace(1.0, 1 / num_inference_steps, num_inference_steps))
        if mu is None:  # Diffusers computes it whatever the scheduler; one without dynamic shifting ignores it
            mu = resolution_shift(tokens, self.scheduler.config)
        return self.flow_schedule(num_inference_steps, sigmas, mu, tokens)

    def _finish(self, latents: np.ndarray, latent_hw: tuple[int, int], kw: dict[str, Any],
                timings: dict[str, float]) -> Any:
        if kw["output_type"] == "latent":  # packed, as Diffusers returns them
            return PipelineOutput(latents, timings) if kw["return_dict"] else (latents, None)
        return self.finish(unpack_latents(latents, *latent_hw), kw["output_type"], kw["return_dict"], timings)


class FluxPipeline(_FluxBase):
    """Text-to-image, `pipe(prompt, ...)` with Diffusers' arguments and defaults."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        mu: float | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs (all before any engine runs).
        height, width = height or self.default_size(), width or self.default_size()
        kw = locals()
        batch_size, do_cfg = self._check_call(height, width, kw)
        rows = batch_size * num_images_per_prompt
        latent_hw = self._latent_size(height, width)
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        checks.check_latents(latents, (rows, tokens, 4 * self._latent_channels))
        generator = to_generator(generator)
        # 2. Timesteps, shifted for the image's token count.
        scheduler, steps = self._schedule(num_inference_steps, sigmas, mu, tokens)
        # 3. Encode the prompts.
        with self._stage(timings, "text_encoder"):
            feeds = self._conditioning(kw, do_cfg, rows, latent_hw)
        # 4. Initial latents, drawn unpacked (as Diffusers draws them) and packed.
        if latents is None:
            latents = pack_latents(randn_tensor((rows, self._latent_channels, *latent_hw), generator))
        # 5. Denoise; 6. decode.
        state = DenoiseState(feeds, true_cfg_scale, do_cfg)
        latents, _ = self.denoise(scheduler, np.asarray(latents, np.float32), steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        return self._finish(latents, latent_hw, kw, timings)


class FluxImg2ImgPipeline(_FluxBase):
    """Image-to-image: the image's latents are noised to `strength` along the flow, packed, then denoised."""

    required_components = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 28,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 512,
        mu: float | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs; as in Diffusers, the image is resized to `height` x `width` (default: 1024 x 1024).
        checks.check_range("strength", strength, 0.0, 1.0)
        if image is None:
            raise InputError("`image` is required here")
        unit = self.vae_scale_factor * 2
        height, width = height or self.default_size(), width or self.default_size()
        kw = locals()
        batch_size, do_cfg = self._check_call(height, width, kw, encodes=True, source="image")
        rows = batch_size * num_images_per_prompt
        latent_hw = self._latent_size(height, width)
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        checks.check_latents(latents, (rows, tokens, 4 * self._latent_channels))
        pixels = preprocess_image(image, height, width, vae_scale_factor=unit)
        check_image_batch("image", pixels.shape[0], rows)
        generator = to_generator(generator)
        # 2. Timesteps, shifted, then cut to `strength`.
        scheduler, steps = self._schedule(num_inference_steps, sigmas, mu, tokens)
        steps = self.strength_schedule(scheduler, steps, strength,
                                       requested_steps(num_inference_steps, sigmas is not None, steps))
        # 3. Encode the prompts.
        with self._stage(timings, "text_encoder"):
            feeds = self._conditioning(kw, do_cfg, rows, latent_hw)
        # 4. The image's latents noised to the first timestep and packed (the caller's `latents` replace them).
        if latents is None:
            with self._stage(timings, "vae_encode"):
                if isinstance(generator, list) and pixels.shape[0] < rows:
                    pixels = tile_batch(pixels, rows, "image")
                image_latents = tile_batch(self.scale_latents(self.encode_image(pixels, generator)), rows, "image")
            noise = randn_tensor(image_latents.shape, generator)
            latents = pack_latents(scheduler.add_noise(image_latents, noise, np.repeat(steps[:1], rows)))
        # 5. Denoise; 6. decode.
        state = DenoiseState(feeds, true_cfg_scale, do_cfg)
        latents, _ = self.denoise(scheduler, np.asarray(latents, np.float32), steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        return self._finish(latents, latent_hw, kw, timings)
