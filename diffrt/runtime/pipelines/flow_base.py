"""What the flow-matching transformer pipelines (SD3 / SD3.5, FLUX.1) share: the `transformer` component in place
of the UNet, the resolution-dependent schedule shift, argument checks against the package, and the decode.

The shared denoising loop of `DiffusionPipeline.denoise` runs them unchanged: `denoiser_feeds` / `run_denoiser`
feed the transformer its Optimum-named inputs, and the flow-matching scheduler's `scale_model_input` is the
identity. SD3 keeps the latents as [batch, 16, h, w]; FLUX keeps them packed ([batch, h/2 * w/2, 64]) through the
loop and unpacks before the VAE, as Diffusers does.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import numpy as np

from diffrt.errors import InputError, PackageError, invalid
from diffrt.runtime.image import postprocess
from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.base import DiffusionPipeline, PipelineOutput
from diffrt.runtime.pipelines.checks import intersect_extents, scaled_extent
from diffrt.runtime.pipelines.flow_prompts import MAX_SEQUENCE_LENGTH, T5TextEncoder
from diffrt.runtime.tokenizer_t5 import T5Tokenizer
from diffrt.schedulers.protocol import Scheduler

#: Diffusers' `default_sample_size` of the FLUX pipelines (no sample_size in the transformer config): 1024 px
FLUX_SAMPLE_SIZE = 128


def resolution_shift(image_seq_len: int, config: Any) -> float:
    """`mu` for `use_dynamic_shifting`: linear in the image token count between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) (Diffusers' `calculate_shift`; Esser et al. 2024, sec. 5.3.2)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


class FlowTransformerPipeline(DiffusionPipeline):
    """Base of the SD3 and FLUX pipelines; not used directly."""

    denoiser_name = "transformer"
    _callback_tensor_inputs: tuple[str, ...] = ("latents", "prompt_embeds")

    @cached_property
    def transformer_config(self) -> dict[str, Any]:
        return dict(self.package.component("transformer").config or {})

    @cached_property
    def tokenizer_3(self) -> T5Tokenizer | None:
        return self._t5_tokenizer("tokenizer_3")

    def _t5_tokenizer(self, name: str) -> T5Tokenizer | None:
        return T5Tokenizer.from_folder(self.package.tokenizer_dir(name)) if self.package.has(name) else None

    def t5_encoder(self, name: str, tokenizer_name: str) -> T5TextEncoder | None:
        """The T5 encoder `name` with its tokenizer; None when the package has no such encoder."""
        if not self.has_component(name):
            return None
        tokenizer = self._t5_tokenizer(tokenizer_name)
        if tokenizer is None:
            raise PackageError(f"this package has `{name}` but no `{tokenizer_name}` folder for its tokenizer")
        batch = self.package.component(name).dim_ranges.get("batch")
        return T5TextEncoder(tokenizer, self.engine(name), batch[1] if batch else None)

    def default_size(self) -> int:
        sample_size = self.transformer_config.get("sample_size") or FLUX_SAMPLE_SIZE
        return int(sample_size) * self.vae_scale_factor

    def run_denoiser(self, feeds: dict[str, np.ndarray], release_memory: bool = False) -> np.ndarray:
        engine = self.engine("transformer")
        dtypes = {spec.name: spec.dtype for spec in engine.inputs}
        cast = {k: v.astype(dtypes[k], copy=False) for k, v in feeds.items() if k in dtypes}
        out = engine.run(cast, release_memory=release_memory)
        return np.asarray(out["out_hidden_states"], dtype=np.float32)

    # ----- schedule -----
    def flow_schedule(self, num_inference_steps: int, sigmas: Sequence[float] | None, mu: float | None,
                      image_seq_len: int) -> tuple[Scheduler, np.ndarray]:
        """This call's scheduler and timesteps; with `use_dynamic_shifting` and no `mu`, `mu` follows the image's
        token count (`resolution_shift`), as both Diffusers pipelines compute it."""
        checks.check_finite("mu", mu)
        scheduler = self.fresh_scheduler()
        config = scheduler.config
        kwargs: dict[str, Any] = {}
        if config.get("use_dynamic_shifting") and mu is None:
            mu = resolution_shift(image_seq_len, config)
        if mu is not None:
            kwargs["mu"] = float(mu)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, **kwargs)
        return scheduler, np.asarray(scheduler.timesteps)

    def strength_schedule(self, scheduler: Scheduler, steps: np.ndarray, strength: float,
                          num_steps: int) -> np.ndarray:
        """The flow image-to-image pipelines' `get_timesteps`: unlike SD's, the start index rounds the fractional
        step count down after subtracting (SD3 / FLUX: int(n - n * strength); SD: n - int(n * strength))."""
        start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
        scheduler.set_begin_index(start * scheduler.order)
        steps = steps[start * scheduler.order:]
        if len(steps) == 0:
            raise InputError(f"`strength`={strength} with {num_steps} steps leaves no denoising step; raise either")
        return steps

    # ----- checks against the package -----
    def check_sequence(self, max_sequence_length: Any, t5_names: Sequence[str], transformer_axis: tuple[str, int],
                       offset: int = 0) -> None:
        """`max_sequence_length` in [1, 512] and inside what the T5 encoder and the transformer take (`offset`:
        tokens the transformer sees before the T5 ones, SD3's 77 CLIP tokens)."""
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, (int, np.integer)) \
                or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise invalid("max_sequence_length", f"an integer in [1, {MAX_SEQUENCE_LENGTH}]", max_sequence_length)
        extents = [self.limits.extent(name, "input_ids", 1) for name in t5_names]
        tensor, axis = transformer_axis
        outer = self.limits.extent("transformer", tensor, axis)
        if outer is not None:
            extents.append((outer[0] - offset, outer[1] - offset))
        low, high = intersect_extents(extents)
        if not low <= max_sequence_length <= high:
            raise invalid("max_sequence_length", f"an integer in [{low}, {high}] for this package (its T5 encoder "
                          "and transformer sequence ranges)", max_sequence_length)

    def check_batch(self, prompts: int, num_images_per_prompt: int, rows_per_image: int,
                    text_encoders: Sequence[str], encodes: bool = False) -> None:
        """Images x rows (2 under classifier-free guidance) against the transformer's and VAE's batch ranges, and
        prompts against the text encoders' (same messages as the UNet pipelines)."""
        images = prompts * num_images_per_prompt
        per_image = [("transformer", "hidden_states", rows_per_image, "transformer"),
                     (self.vae_components["vae_decoder"], "latent_sample", 1, "VAE decoder")]
        if encodes:
            per_image.append((self.vae_components["vae_encoder"], "sample", 1, "VAE encoder"))
        for component, tensor, per, what in per_image:
            extent = self.limits.extent(component, tensor, 0)
            if extent is not None and not extent[0] <= images * per <= extent[1]:
                guided = " (classifier-free guidance runs 2 rows per image)" if per == 2 else ""
                raise InputError(
                    f"`num_images_per_prompt` x prompts must be in [{-(-extent[0] // per)}, {extent[1] // per}] "
                    f"images per call for this package: its {what} takes batches of {extent[0]}..{extent[1]} "
                    f"rows{guided}; got {num_images_per_prompt} x {prompts} prompt(s) = {images} images")
        for encoder in text_encoders:
            extent = self.limits.extent(encoder, "input_ids", 0)
            if extent is not None and not extent[0] <= prompts <= extent[1]:
                raise invalid("prompt", f"{extent[0]}..{extent[1]} prompts per call for this package's {encoder}",
                              f"{prompts} prompts")

    def check_vae_size(self, height: int, width: int, encodes: bool, source: str | None = None) -> None:
        """Latent sides against the VAE decoder's (and encoder's) ranges."""
        factor = self.vae_scale_factor
        for axis, name, value in ((2, "height", height), (3, "width", width)):
            extents = [scaled_extent(self.limits.extent(self.vae_components["vae_decoder"], "latent_sample", axis),
                               factor)]
            if encodes:
                extents.append(self.limits.extent(self.vae_components["vae_encoder"], "sample", axis))
            low, high = intersect_extents(extents)
            if not low <= value <= high:
                raise invalid(source or name, f"a {name} in [{low}, {high}] pixels for this package (its VAE's "
                              f"latent range x the VAE scale factor {factor})", value)

    def finish(self, latents: np.ndarray, output_type: str, return_dict: bool, timings: dict[str, float]) -> Any:
        """Decode the final [batch, channels, h, w] latents (or return them for `output_type="latent"`)."""
        images: Any
        if output_type == "latent":
            images = latents
        else:
            with self._stage(timings, "vae_decode"):
                images = postprocess(self.decode(latents), output_type=output_type)
        return PipelineOutput(images, timings) if return_dict else (images, None)

