"""Prompt encoding: tokenizer + text-encoder engine -> the embeddings the UNet is conditioned on.

Mirrors `encode_prompt` of the Diffusers SD and SDXL pipelines step for step, so the same prompt gives the same
embeddings (including clip skip, "!" padding, SDXL's penultimate layer and zeroed negatives).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from diffrt.errors import InputError, PackageError
from diffrt.runtime.engines.base import Engine
from diffrt.runtime.tokenizer import CLIPTokenizer

_HIDDEN = re.compile(r"^hidden_states\.(\d+)$")


@dataclass
class TextEncoding:
    last_hidden_state: np.ndarray
    hidden_states: list[np.ndarray]  # embeddings output first, like transformers' `hidden_states`
    pooled: np.ndarray | None  # `text_embeds` of a text encoder with projection (what SDXL pools), else None
    normed_hidden_states: dict[int, np.ndarray]  # index -> final_layer_norm(hidden_states[index])
    pooler_output: np.ndarray | None = None  # the end token's state of a text encoder without projection (FLUX)


class TextEncoder:
    """One CLIP tokenizer and its text-encoder engine."""

    def __init__(self, tokenizer: CLIPTokenizer, engine: Engine, max_batch: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.engine = engine
        self.max_batch = max_batch  # the engine's batch limit (weighted prompts can need more rows: run in slices)

    def __call__(self, prompts: Sequence[str], max_length: int | None = None) -> TextEncoding:
        ids = self.tokenizer(list(prompts), max_length=max_length or self.tokenizer.model_max_length)
        return self.encode_ids(ids)

    def encode_ids(self, ids: np.ndarray) -> TextEncoding:
        step = self.max_batch or len(ids)
        parts = [self.engine.run({"input_ids": ids[i : i + step]}) for i in range(0, len(ids), step)]
        outputs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
        hidden = sorted(((int(m.group(1)), v) for k, v in outputs.items() if (m := _HIDDEN.match(k))))
        pooled = outputs.get("text_embeds")
        normed = {
            int(k.rsplit(".", 1)[1]): v for k, v in outputs.items() if k.startswith("normed_hidden_states.")
        }
        return TextEncoding(outputs["last_hidden_state"], [v for _, v in hidden], pooled, normed,
                            outputs.get("pooler_output"))


def as_prompt_list(prompt: str | Sequence[str] | None, name: str = "prompt") -> list[str] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InputError(f"`{name}` must be a string or a list of strings; got {type(prompt).__name__}")


def negative_list(negative: str | Sequence[str] | None, batch_size: int, name: str = "negative_prompt") -> list[str]:
    """Diffusers' rule: None -> "", a string -> repeated, a list -> must match the prompt batch."""
    if negative is None:
        return [""] * batch_size
    if isinstance(negative, str):
        return [negative] * batch_size
    negatives = as_prompt_list(negative, name)
    assert negatives is not None
    if len(negatives) != batch_size:
        raise InputError(
            f"`{name}` has {len(negatives)} entries but `prompt` has {batch_size}; pass one per prompt or a string"
        )
    return negatives


def repeat_per_prompt(array: np.ndarray, num_images_per_prompt: int) -> np.ndarray:
    """Each prompt's row repeated `num_images_per_prompt` times in a row, as `repeat(...).view(...)` does."""
    return np.repeat(array, num_images_per_prompt, axis=0) if num_images_per_prompt > 1 else array


def clip_skip_embeds(encoding: TextEncoding, clip_skip: int) -> np.ndarray:
    layers = len(encoding.hidden_states) - 1
    if not 1 <= clip_skip < layers:
        raise InputError(f"`clip_skip` must be an integer in [1, {layers - 1}] for this text encoder; got {clip_skip}")
    index = layers - clip_skip
    if index not in encoding.normed_hidden_states:
        raise PackageError(
            "this package's text_encoder has no `normed_hidden_states.N` outputs needed for clip_skip; "
            "re-export it with `diffrt export`"
        )
    return encoding.normed_hidden_states[index]


def encode_sd(
    encoder: TextEncoder,
    prompts: list[str],
    negatives: list[str] | None,
    clip_skip: int | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """SD 1.x / 2.x: last hidden state (or final_layer_norm of an earlier layer with clip skip)."""
    encoding = encoder(prompts)
    embeds = encoding.last_hidden_state if clip_skip is None else clip_skip_embeds(encoding, clip_skip)
    negative = None
    if negatives is not None:
        negative = encoder(negatives, max_length=embeds.shape[1]).last_hidden_state
    return embeds, negative


@dataclass
class SdxlEmbeddings:
    """SDXL's prompt embeddings; each may be None while being assembled from what the caller passed."""

    prompt_embeds: np.ndarray | None
    pooled: np.ndarray | None
    negative_prompt_embeds: np.ndarray | None = None
    negative_pooled: np.ndarray | None = None


def encode_sdxl(
    encoders: list[TextEncoder],
    prompts: list[list[str]],
    negatives: list[list[str]] | None,
    clip_skip: int | None,
    zero_negative: bool,
) -> SdxlEmbeddings:
    """SDXL: penultimate hidden states of each encoder concatenated; pooled projection of the last encoder.

    `prompts` / `negatives` hold one prompt list per encoder (prompt and prompt_2). A negative that is all None
    with `force_zeros_for_empty_prompt` becomes zeros (`zero_negative`), exactly as Diffusers does.
    """
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    embeds, pooled = _encode_each(encoders, prompts, layer)
    result = SdxlEmbeddings(embeds, pooled)
    if zero_negative:
        result.negative_prompt_embeds = np.zeros_like(embeds)
        result.negative_pooled = np.zeros_like(pooled)
    elif negatives is not None:
        result.negative_prompt_embeds, result.negative_pooled = encode_sdxl_negatives(encoders, negatives)
    return result


def encode_sdxl_negatives(encoders: list[TextEncoder], negatives: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """The negative side: Diffusers ignores clip_skip there, always the penultimate layer."""
    return _encode_each(encoders, negatives, -2)


def _encode_each(encoders: list[TextEncoder], prompts: list[list[str]], layer: int) -> tuple[np.ndarray, np.ndarray]:
    parts, pooled = [], None
    for encoder, texts in zip(encoders, prompts):
        encoding = encoder(texts)
        if not -len(encoding.hidden_states) <= layer < 0:
            layers = len(encoding.hidden_states) - 1
            raise InputError(f"`clip_skip` is too large for a text encoder with {layers} layers")
        parts.append(encoding.hidden_states[layer])
        if pooled is None and encoding.pooled is not None:
            pooled = encoding.pooled
    if pooled is None:
        raise PackageError("SDXL needs a text encoder with a `text_embeds` output (text_encoder_2)")
    return np.concatenate(parts, axis=-1), pooled
