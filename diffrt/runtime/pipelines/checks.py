"""Argument validation shared by the pipelines: every check runs before any engine does, and names the argument."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from diffrt.errors import InputError, invalid

OUTPUT_TYPES = ("pil", "np", "latent")
PROMPT_WEIGHTINGS = ("a1111",)  # AUTOMATIC1111's emphasis syntax and long prompts


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
    number = isinstance(value, (int, float, np.floating, np.integer))
    if not number or value < low or (high is not None and value > high):
        allowed = f"a number in [{low}, {high}]" if high is not None else f"a number >= {low}"
        raise invalid(name, allowed, value)


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


def present(array: np.ndarray | None, name: str) -> np.ndarray:
    """`array`, which the call's own logic has produced by now; InputError naming it if it is missing."""
    if array is None:
        raise InputError(f"`{name}` is required here (pass it, or the prompt it is encoded from)")
    return array


def check_embeds(name: str, embeds: Any, batch: int | None = None) -> np.ndarray | None:
    if embeds is None:
        return None
    array = np.asarray(embeds, dtype=np.float32)
    if batch is not None and array.shape[0] != batch:
        raise invalid(name, f"a batch of {batch} rows (one per prompt)", f"shape {array.shape}")
    return array


def check_callback_inputs(names: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise invalid("callback_on_step_end_tensor_inputs", f"a subset of {list(allowed)}", unknown)


def check_same_shape(name: str, array: np.ndarray, other_name: str, other: np.ndarray) -> None:
    """The negative and positive halves the UNet sees side by side need one (sequence, channels) shape."""
    if array.shape[1:] != other.shape[1:]:
        raise invalid(name, f"rows of `{other_name}`'s shape {other.shape[1:]}", f"shape {array.shape}")


def check_prompt_weighting(value: Any) -> None:
    if value is not None and value not in PROMPT_WEIGHTINGS:
        raise invalid("prompt_weighting", f"None (Diffusers' plain prompts) or one of {PROMPT_WEIGHTINGS}", value)
