"""Argument validation shared by the pipelines: every check runs before any engine does, and names the argument.

Besides types and ranges, arguments are checked against what the package can take (`PackageLimits`: the manifest's
dimension ranges for the UNet, the VAE and the text encoders) and against what the scheduler's timestep grid can
hold, so an impossible call fails at once with the user's parameter name instead of after the prompt encoding,
a huge noise allocation or hours of steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from diffrt.errors import InputError, invalid
from diffrt.package.reader import ModelPackage

OUTPUT_TYPES = ("pil", "np", "latent")
PROMPT_WEIGHTINGS = ("a1111",)  # AUTOMATIC1111's emphasis syntax and long prompts


def check_component_options(options: Any, package: ModelPackage) -> dict[str, dict[str, Any]]:
    """`component_options`: {component name: {engine option: value}}, each name one of the package's components."""
    if options is None:
        return {}
    allowed = ", ".join(package.components)
    if not isinstance(options, dict) or not all(isinstance(value, dict) for value in options.values()):
        raise invalid("component_options", f"a dict of component name -> dict of engine options ({allowed})",
                      options)
    unknown = [name for name in options if name not in package.components]
    if unknown:
        raise invalid("component_options", f"keys among this package's components ({allowed})", unknown[0])
    return {name: dict(value) for name, value in options.items()}


def check_size(height: int, width: int, multiple: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
            raise invalid(name, f"a positive multiple of {multiple} (the VAE's downsampling factor)", value)


def check_steps(num_inference_steps: Any, timesteps: Any, sigmas: Any) -> None:
    if timesteps is not None and sigmas is not None:
        raise InputError("pass only one of `timesteps` and `sigmas`, not both")
    if timesteps is None and sigmas is None:
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise invalid("num_inference_steps", "an integer >= 1", num_inference_steps)


def check_range(name: str, value: Any, low: float, high: float | None = None) -> None:
    """A finite real number in [low, high]: NaN compares false with every bound, so it is refused by name first."""
    number = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if number and not math.isfinite(value):
        raise invalid(name, "a finite number (not NaN or infinity)", value)
    if not number or value < low or (high is not None and value > high):
        allowed = f"a number in [{low}, {high}]" if high is not None else f"a number >= {low}"
        raise invalid(name, allowed, value)


def check_finite(name: str, value: Any) -> None:
    """A finite real number, or None (the argument's default)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise invalid(name, "a number", value)
    if not math.isfinite(value):
        raise invalid(name, "a finite number (not NaN or infinity)", value)


def check_optional_fraction(name: str, value: Any) -> None:
    """`denoising_start` / `denoising_end`: None or a number in [0, 1]; NaN would otherwise be ignored silently."""
    if value is not None:
        check_range(name, value, 0.0, 1.0)


def check_size_pair(name: str, value: Any) -> None:
    """SDXL's size conditioning (`original_size`, `crops_coords_top_left`, ...): None or two finite numbers."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise invalid(name, "a (height, width) pair", value)
    for item in value:
        check_finite(name, item)


def check_finite_array(name: str, array: np.ndarray | None) -> None:
    if array is not None and array.size and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise invalid(name, "finite values", f"{bad} NaN/infinite values")


def check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise invalid(name, "an integer >= 1", value)


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise invalid("output_type", f"one of {', '.join(OUTPUT_TYPES)}", output_type)


def check_clip_skip(clip_skip: Any) -> None:
    if clip_skip is not None and (not isinstance(clip_skip, (int, np.integer)) or clip_skip < 1):
        raise invalid("clip_skip", "None or an integer >= 1", clip_skip)


def check_generator_count(generator: Any, batch: int) -> None:
    if isinstance(generator, list) and len(generator) != batch:
        raise InputError(
            f"`generator` is a list of {len(generator)} generators but the effective batch size "
            f"(prompts x num_images_per_prompt) is {batch}; pass one generator per image"
        )


def check_latents(latents: np.ndarray | None, shape: Sequence[int]) -> None:
    if latents is not None and tuple(np.shape(latents)) != tuple(shape):
        raise invalid("latents", f"an array of shape {tuple(shape)}", f"shape {tuple(np.shape(latents))}")
    if latents is not None:
        check_finite_array("latents", np.asarray(latents, dtype=np.float32))


def present(array: np.ndarray | None, name: str) -> np.ndarray:
    """`array`, which the call's own logic has produced by now; InputError naming it if it is missing."""
    if array is None:
        raise InputError(f"`{name}` is required here (pass it, or the prompt it is encoded from)")
    return array


def check_embeds(
    name: str, embeds: Any, batch: int | None = None, trailing: Sequence[tuple[int, int] | None] | None = None
) -> np.ndarray | None:
    """User-given embeddings as float32: finite, `batch` rows, and per trailing axis inside its (low, high) extent
    (None: any size) -- so a wrong width is named here, not found by NumPy or the engine later."""
    if embeds is None:
        return None
    try:
        array = np.asarray(embeds, dtype=np.float32)
    except (TypeError, ValueError):
        raise invalid(name, "a float array", type(embeds).__name__) from None
    if trailing is not None:
        expected = ", ".join(_describe_extent(extent) for extent in trailing)
        if array.ndim != 1 + len(trailing) or not all(
                extent is None or extent[0] <= size <= extent[1] for size, extent in zip(array.shape[1:], trailing)):
            raise invalid(name, f"an array of shape (batch, {expected}) for this package", f"shape {array.shape}")
    if array.ndim == 0:
        raise invalid(name, "an array with a batch axis", f"shape {array.shape}")
    if batch is not None and array.shape[0] != batch:
        raise invalid(name, f"a batch of {batch} rows (one per prompt)", f"shape {array.shape}")
    check_finite_array(name, array)
    return array


def check_same_shape(name: str, array: np.ndarray | None, other_name: str, other: np.ndarray | None) -> None:
    """Diffusers' rule: a negative embedding has the shape of its positive one."""
    if array is not None and other is not None and array.shape != other.shape:
        raise invalid(name, f"the shape of `{other_name}` {other.shape}", f"shape {array.shape}")


def _describe_extent(extent: tuple[int, int] | None) -> str:
    if extent is None:
        return "any"
    return str(extent[0]) if extent[0] == extent[1] else f"{extent[0]}..{extent[1]}"


def check_callback_inputs(names: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise invalid("callback_on_step_end_tensor_inputs", f"a subset of {list(allowed)}", unknown)


def check_steps_fit(scheduler: Any, num_inference_steps: Any, timesteps: Any, sigmas: Any) -> None:
    """A scheduler on the discrete training grid (it has `alphas_cumprod`) cannot take more steps than its
    `num_train_timesteps`: Diffusers' DDIM/DDPM refuse it, the sigma schedulers would repeat grid points for hours."""
    if timesteps is not None or sigmas is not None or getattr(scheduler, "alphas_cumprod", None) is None:
        return
    train = int(scheduler.config.num_train_timesteps)
    if num_inference_steps > train:
        raise invalid("num_inference_steps",
                      f"an integer in [1, {train}] (the scheduler's num_train_timesteps, its timestep grid)",
                      num_inference_steps)


# ----- what the package can take -----
Extent = tuple[int, int]


@dataclass(frozen=True)
class PackageLimits:
    """The sizes a package's engines accept, from its manifest (`dims` ranges and fixed dims): batch rows of the
    UNet, the VAE and the text encoders, and latent sides. Without a manifest (Optimum packages) nothing is
    known and nothing is refused here; the engine still checks its feeds."""

    package: ModelPackage
    vae_scale_factor: int

    def extent(self, component: str, tensor: str, axis: int) -> Extent | None:
        """The inclusive size range of one axis of one input of one component (None: unknown / unbounded)."""
        if not self.package.has(component):
            return None
        info = self.package.component(component)
        spec = next((s for s in info.inputs or () if s.name == tensor), None)
        if spec is None or axis >= len(spec.shape):
            return None
        dim = spec.shape[axis]
        if isinstance(dim, int):
            return (dim, dim)
        return info.dim_ranges.get(dim) if isinstance(dim, str) else None

    def check_size(self, height: int, width: int, vae_components: dict[str, str], encodes: bool,
                   source: str | None = None) -> None:
        """`height` / `width` in pixels against the UNet's and the VAE's latent ranges (and the encoder's pixel
        ranges when the call encodes an image). `source` names the argument the size came from (image-to-image
        runs at its `image`'s size), otherwise the error names `height` / `width`."""
        factor = self.vae_scale_factor
        why = f"the latent sizes its UNet and VAE take, x the VAE scale factor {factor}"
        for axis, name, value in ((2, "height", height), (3, "width", width)):
            extents = [scaled_extent(self.extent("unet", "sample", axis), factor),
                       scaled_extent(self.extent(vae_components["vae_decoder"], "latent_sample", axis), factor)]
            if encodes:
                extents.append(self.extent(vae_components["vae_encoder"], "sample", axis))
            low, high = intersect_extents(extents)
            if low <= value <= high:
                continue
            if source is not None:
                raise invalid(source, f"an image whose {name} is in [{low}, {high}] pixels for this package ({why})",
                              f"{height}x{width} (height x width)")
            raise invalid(name, f"in [{low}, {high}] pixels for this package ({why})", value)

    def check_batch(self, prompts: int, num_images_per_prompt: int, do_cfg: bool, vae_components: dict[str, str],
                    encodes: bool, text_encoders: Sequence[str]) -> None:
        """Prompts x num_images_per_prompt images against every engine's batch range: the UNet runs two rows per
        image under classifier-free guidance, the VAE one, the text encoders one per prompt."""
        rows = 2 if do_cfg else 1
        per_image = [(self.extent("unet", "sample", 0), rows, "UNet"),
                     (self.extent(vae_components["vae_decoder"], "latent_sample", 0), 1, "VAE decoder")]
        if encodes:
            per_image.append((self.extent(vae_components["vae_encoder"], "sample", 0), 1, "VAE encoder"))
        images = prompts * num_images_per_prompt
        for extent, per, what in per_image:
            if extent is not None and not extent[0] <= images * per <= extent[1]:
                low, high = -(-extent[0] // per), extent[1] // per
                guided = " (classifier-free guidance runs 2 rows per image)" if per == 2 else ""
                raise InputError(
                    f"`num_images_per_prompt` x prompts must be in [{low}, {high}] images per call for this "
                    f"package: its {what} takes batches of {extent[0]}..{extent[1]} rows{guided}; got "
                    f"{num_images_per_prompt} x {prompts} prompt(s) = {images} images"
                )
        for encoder in text_encoders:
            extent = self.extent(encoder, "input_ids", 0)
            if extent is not None and not extent[0] <= prompts <= extent[1]:
                raise invalid("prompt", f"{extent[0]}..{extent[1]} prompts per call for this package's {encoder}",
                              f"{prompts} prompts")

    def embeds_shape(self, name: str, fallback_width: Any) -> list[Extent | None]:
        """Expected trailing axes of `prompt_embeds` (sequence, width) or `pooled_prompt_embeds` (width)."""
        if name == "text_embeds":
            width = self.extent("unet", "text_embeds", 1)
            return [width if width is not None else _fixed(fallback_width)]
        sequence = self.extent("unet", "encoder_hidden_states", 1)
        width = self.extent("unet", "encoder_hidden_states", 2)
        return [sequence, width if width is not None else _fixed(fallback_width)]


def _fixed(value: Any) -> Extent | None:
    return (int(value), int(value)) if isinstance(value, int) and not isinstance(value, bool) else None


def scaled_extent(extent: Extent | None, factor: int) -> Extent | None:
    return None if extent is None else (extent[0] * factor, extent[1] * factor)


def intersect_extents(extents: Sequence[Extent | None]) -> Extent:
    known = [e for e in extents if e is not None]
    low = max((e[0] for e in known), default=1)
    high = min((e[1] for e in known), default=2**31 - 1)
    return low, high


def check_prompt_weighting(value: Any) -> None:
    if value is not None and value not in PROMPT_WEIGHTINGS:
        raise invalid("prompt_weighting", f"None (Diffusers' plain prompts) or one of {PROMPT_WEIGHTINGS}", value)
