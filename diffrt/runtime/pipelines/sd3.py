"""Stable Diffusion 3 / 3.5 pipelines (MMDiT transformer, flow matching): text-to-image and image-to-image.

Diffusers' `StableDiffusion3Pipeline` arguments and defaults (28 steps, guidance 7.0 with true classifier-free
guidance, `max_sequence_length` 256). A package without `text_encoder_3` runs as Diffusers does with
`text_encoder_3=None`: zeros in place of the T5 tokens. Skip-layer guidance (`skip_guidance_layers`) needs a
transformer graph that can skip blocks, which the export does not write: it is refused by name.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from diffrt.errors import invalid
from diffrt.runtime.image import preprocess_image
from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.base import DenoiseState, PipelineOutput, randn_tensor, to_generator
from diffrt.runtime.pipelines.flow_base import FlowTransformerPipeline
from diffrt.runtime.pipelines.flow_prompts import FlowEmbeddings, encode_sd3
from diffrt.runtime.pipelines.prompts import as_prompt_list, negative_list, repeat_per_prompt
from diffrt.runtime.pipelines.stable_diffusion import check_image_batch, requested_steps, tile_batch
from diffrt.runtime.prompt_chunks import CHUNK_LENGTH

PROMPT_KEYS = ("prompt", "prompt_2", "prompt_3")
NEGATIVE_KEYS = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")


class _StableDiffusion3Base(FlowTransformerPipeline):
    required_components: tuple[str, ...] = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    optional_components: tuple[str, ...] = ("text_encoder_3",)
    text_encoder_names: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    component_names: tuple[str, ...] = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                        "tokenizer_2", "tokenizer_3", "transformer", "scheduler")

    def denoiser_feeds(self, feeds: dict[str, np.ndarray], model_input: np.ndarray, t: Any) -> dict[str, np.ndarray]:
        return dict(feeds, hidden_states=model_input,
                    timestep=np.full((model_input.shape[0],), t, dtype=np.float32))

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        device: Any = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        lora_scale: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """Diffusers' `encode_prompt`: (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
        negative_pooled_prompt_embeds), each repeated `num_images_per_prompt` times per prompt; the negatives are
        None without classifier-free guidance. `device` is accepted and ignored (the provider decides)."""
        if lora_scale is not None:
            raise invalid("lora_scale", "None (diffrt has no LoRA for SD3 transformers)", lora_scale)
        checks.check_positive_int("num_images_per_prompt", num_images_per_prompt)
        checks.check_clip_skip(clip_skip)
        given = locals()
        prompts = [as_prompt_list(given[key], key) for key in PROMPT_KEYS]
        batch = self._batch_size(prompts[0], prompt_embeds)
        positive = self._side(prompts, prompt_embeds, pooled_prompt_embeds, "", clip_skip, max_sequence_length)
        negative = None
        if do_classifier_free_guidance:
            negatives = [negative_list(given[key] if given[key] is not None else given["negative_prompt"], batch, key)
                         for key in NEGATIVE_KEYS]
            negative = self._side(negatives, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_",
                                  None, max_sequence_length, batch)
            checks.check_same_shape("negative_prompt_embeds", negative.prompt_embeds, "prompt_embeds",
                                    positive.prompt_embeds)

        def repeat(array: np.ndarray | None) -> Any:
            return None if array is None else repeat_per_prompt(array, num_images_per_prompt)

        return (repeat(positive.prompt_embeds), repeat(negative.prompt_embeds if negative else None),
                repeat(positive.pooled), repeat(negative.pooled if negative else None))

    def _batch_size(self, prompts: list[str] | None, prompt_embeds: Any) -> int:
        if prompts is None and prompt_embeds is None:
            raise checks.InputError("pass `prompt` or `prompt_embeds`")
        if prompts is not None and prompt_embeds is not None:
            raise checks.InputError("pass only one of `prompt` and `prompt_embeds`")
        return len(prompts) if prompts is not None else int(np.shape(prompt_embeds)[0])

    def _side(self, prompts: Sequence[list[str] | None], embeds: Any, pooled: Any, prefix: str, clip_skip: int | None,
              max_sequence_length: int, batch: int | None = None) -> FlowEmbeddings:
        """One side's embeddings: the caller's (checked), or the prompts encoded (prompt_2 / _3 default to it)."""
        joint, pooled_width = self.transformer_config.get("joint_attention_dim"), \
            self.transformer_config.get("pooled_projection_dim")
        given = checks.check_embeds(f"{prefix}prompt_embeds", embeds, batch,
                                    [None, (joint, joint) if isinstance(joint, int) else None])
        given_pooled = checks.check_embeds(f"{prefix}pooled_prompt_embeds", pooled, batch,
                                           [(pooled_width, pooled_width) if isinstance(pooled_width, int) else None])
        if given is not None:
            if given_pooled is None:
                raise checks.InputError(f"`{prefix}pooled_prompt_embeds` is required together with "
                                        f"`{prefix}prompt_embeds`")
            return FlowEmbeddings(given, given_pooled)
        first = prompts[0] or []
        texts = [first, prompts[1] or first, prompts[2] or first]
        clips = [self.prompt_encoder("text_encoder", "tokenizer"), self.prompt_encoder("text_encoder_2", "tokenizer_2")]
        t5 = self.t5_encoder("text_encoder_3", "tokenizer_3")
        return encode_sd3(clips, t5, texts, clip_skip, max_sequence_length, int(joint or 4096))

    def _check_call(self, height: int, width: int, kw: dict[str, Any], encodes: bool = False,
                    source: str | None = None) -> tuple[int, bool]:
        """Every argument of a call, before any engine runs; returns (prompt batch, classifier-free guidance)."""
        if kw.get("skip_guidance_layers") is not None:
            raise invalid("skip_guidance_layers", "None (skip-layer guidance needs a transformer graph that can skip "
                          "blocks; diffrt's export writes the whole transformer)", kw["skip_guidance_layers"])
        multiple = self.vae_scale_factor * int(self.transformer_config.get("patch_size", 2))
        checks.check_size(height, width, multiple)
        checks.check_steps(kw["num_inference_steps"], None, kw["sigmas"])
        checks.check_range("guidance_scale", kw["guidance_scale"], 0.0)
        checks.check_positive_int("num_images_per_prompt", kw["num_images_per_prompt"])
        checks.check_output_type(kw["output_type"])
        checks.check_clip_skip(kw["clip_skip"])
        checks.check_callback_inputs(kw["callback_on_step_end_tensor_inputs"], self._callback_tensor_inputs)
        for key in PROMPT_KEYS[1:] + NEGATIVE_KEYS:
            as_prompt_list(kw[key], key)
        batch = self._batch_size(as_prompt_list(kw["prompt"]), kw["prompt_embeds"])
        do_cfg = kw["guidance_scale"] > 1.0
        self.check_sequence(kw["max_sequence_length"], ["text_encoder_3"], ("encoder_hidden_states", 1), CHUNK_LENGTH)
        self.check_vae_size(height, width, encodes, source)
        for axis, name, value in ((2, "height", height), (3, "width", width)):
            extent = self.limits.extent("transformer", "hidden_states", axis)
            latent = value // self.vae_scale_factor
            if extent is not None and not extent[0] <= latent <= extent[1]:
                raise invalid(source or name, f"in [{extent[0] * self.vae_scale_factor}, "
                              f"{extent[1] * self.vae_scale_factor}] pixels for this package's transformer", value)
        self.check_batch(batch, kw["num_images_per_prompt"], 2 if do_cfg else 1,
                         [n for n in self.text_encoder_names if self.has_component(n)], encodes)
        checks.check_generator_count(kw["generator"], batch * kw["num_images_per_prompt"])
        return batch, do_cfg

    def _encode(self, kw: dict[str, Any], do_cfg: bool) -> dict[str, np.ndarray]:
        """The transformer's conditioning feeds, CFG-concatenated [negative; positive]."""
        keys = PROMPT_KEYS + NEGATIVE_KEYS + ("num_images_per_prompt", "prompt_embeds", "negative_prompt_embeds",
                                             "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "clip_skip",
                                             "max_sequence_length")
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            **{key: kw[key] for key in keys}, do_classifier_free_guidance=do_cfg)
        if do_cfg:
            assert negative is not None and negative_pooled is not None
            embeds, pooled = np.concatenate([negative, embeds]), np.concatenate([negative_pooled, pooled])
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, int(self.transformer_config.get("in_channels", 16)), height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def _image_seq_len(self, height: int, width: int) -> int:
        patch = int(self.transformer_config.get("patch_size", 2))
        return (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)


class StableDiffusion3Pipeline(_StableDiffusion3Base):
    """Text-to-image, `pipe(prompt, ...)` with Diffusers' arguments and defaults."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 256,
        skip_guidance_layers: Sequence[int] | None = None,
        mu: float | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs (all before any engine runs).
        height, width = height or self.default_size(), width or self.default_size()
        kw = locals()
        batch_size, do_cfg = self._check_call(height, width, kw)
        shape = self._latent_shape(batch_size * num_images_per_prompt, height, width)
        checks.check_latents(latents, shape)
        generator = to_generator(generator)
        # 2. Timesteps (shifted for the resolution when the scheduler asks for it).
        scheduler, steps = self.flow_schedule(num_inference_steps, sigmas, mu, self._image_seq_len(height, width))
        # 3. Encode the prompts.
        with self._stage(timings, "text_encoder"):
            feeds = self._encode(kw, do_cfg)
        # 4. Initial latents; 5. denoise; 6. decode.
        latents = self.prepare_latents(shape, generator, latents, scheduler)
        state = DenoiseState(feeds, guidance_scale, do_cfg)
        latents, _ = self.denoise(scheduler, latents, steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        return self.finish(latents, output_type, return_dict, timings)


class StableDiffusion3Img2ImgPipeline(_StableDiffusion3Base):
    """Image-to-image: the image's latents are noised to `strength` along the flow (`scale_noise`), then denoised."""

    required_components = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder")

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        image: Any = None,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        sigmas: Sequence[float] | None = None,
        guidance_scale: float = 7.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: Any = None,
        latents: np.ndarray | None = None,
        prompt_embeds: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        pooled_prompt_embeds: np.ndarray | None = None,
        negative_pooled_prompt_embeds: np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 256,
        mu: float | None = None,
    ) -> PipelineOutput:
        timings: dict[str, float] = {}
        # 1. Check inputs; as in Diffusers, the image is resized to `height` x `width` (default: the model's size).
        checks.check_range("strength", strength, 0.0, 1.0)
        if image is None:
            raise checks.InputError("`image` is required here")
        height, width = height or self.default_size(), width or self.default_size()
        kw = dict(locals(), skip_guidance_layers=None)
        batch_size, do_cfg = self._check_call(height, width, kw, encodes=True)
        batch = batch_size * num_images_per_prompt
        checks.check_latents(latents, self._latent_shape(batch, height, width))
        pixels = preprocess_image(image, height, width, vae_scale_factor=self.vae_scale_factor)
        check_image_batch("image", pixels.shape[0], batch)
        generator = to_generator(generator)
        # 2. Timesteps, cut to `strength`.
        scheduler, steps = self.flow_schedule(num_inference_steps, sigmas, mu, self._image_seq_len(height, width))
        steps = self.strength_schedule(scheduler, steps, strength,
                                       requested_steps(num_inference_steps, sigmas is not None, steps))
        # 3. Encode the prompts.
        with self._stage(timings, "text_encoder"):
            feeds = self._encode(kw, do_cfg)
        # 4. The image's latents noised to the first timestep; the caller's `latents` replace both (Diffusers).
        if latents is None:
            with self._stage(timings, "vae_encode"):
                image_latents = self._image_latents(pixels, batch, generator)
            noise = randn_tensor(image_latents.shape, generator)
            latents = scheduler.add_noise(image_latents, noise, np.repeat(steps[:1], batch)).astype(np.float32)
        # 5. Denoise; 6. decode.
        state = DenoiseState(feeds, guidance_scale, do_cfg)
        latents, _ = self.denoise(scheduler, latents, steps, state, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, timings)
        return self.finish(latents, output_type, return_dict, timings)

    def _image_latents(self, pixels: np.ndarray, batch: int, generator: Any) -> np.ndarray:
        if isinstance(generator, list) and pixels.shape[0] < batch:
            pixels = tile_batch(pixels, batch, "image")
        return tile_batch(self.scale_latents(self.encode_image(pixels, generator)), batch, "image")
