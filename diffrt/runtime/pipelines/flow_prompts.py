"""Prompt encoding of the flow-matching transformer families: SD3 / SD3.5 (two CLIPs + T5) and FLUX.1 (CLIP + T5).

Mirrors Diffusers' `StableDiffusion3Pipeline.encode_prompt` and `FluxPipeline.encode_prompt` step for step:
- SD3: each CLIP's penultimate hidden state (or `-(clip_skip + 2)`), concatenated along the width, zero-padded to
  the T5 width and followed along the sequence by the T5 tokens (zeros when the package has no T5, as Diffusers
  does with `text_encoder_3=None`); the pooled embedding is both CLIPs' projections side by side.
- FLUX: the CLIP's `pooler_output` is the pooled embedding, the T5 tokens are the sequence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from diffrt.errors import InputError, PackageError
from diffrt.runtime.engines.base import Engine
from diffrt.runtime.pipelines.prompts import TextEncoder
from diffrt.runtime.tokenizer_t5 import T5Tokenizer

logger = logging.getLogger(__name__)

#: Diffusers refuses longer T5 prompts for SD3 and FLUX
MAX_SEQUENCE_LENGTH = 512


class T5TextEncoder:
    """The T5 tokenizer and its encoder engine: prompts -> `last_hidden_state` [batch, max_length, width]."""

    def __init__(self, tokenizer: T5Tokenizer, engine: Engine, max_batch: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.engine = engine
        self.max_batch = max_batch

    def __call__(self, prompts: Sequence[str], max_length: int) -> np.ndarray:
        ids = self.tokenizer(list(prompts), max_length=max_length)
        step = self.max_batch or len(ids)
        parts = [self.engine.run({"input_ids": ids[i : i + step]})["last_hidden_state"]
                 for i in range(0, len(ids), step)]
        return np.concatenate(parts).astype(np.float32, copy=False)


@dataclass
class FlowEmbeddings:
    """One side (positive or negative) of a call's conditioning: the token sequence and the pooled vector."""

    prompt_embeds: np.ndarray
    pooled: np.ndarray


def encode_sd3(clips: Sequence[TextEncoder], t5: T5TextEncoder | None, prompts: Sequence[list[str]],
               clip_skip: int | None, max_sequence_length: int, joint_width: int) -> FlowEmbeddings:
    """SD3's conditioning for `prompts` = (prompt, prompt_2, prompt_3) lists (see the module docstring)."""
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    sequences, pooled = [], []
    for encoder, texts in zip(clips, prompts[:2]):
        encoding = encoder(texts)
        if not -len(encoding.hidden_states) <= layer < 0:
            raise InputError(f"`clip_skip` must be at most {len(encoding.hidden_states) - 2} for this package's "
                             f"text encoders; got {clip_skip}")
        if encoding.pooled is None:
            raise PackageError("SD3's CLIP text encoders need a `text_embeds` output (CLIPTextModelWithProjection)")
        sequences.append(encoding.hidden_states[layer])
        pooled.append(encoding.pooled)
    clip = np.concatenate(sequences, axis=-1)
    batch = clip.shape[0]
    if t5 is not None:
        tokens = t5(prompts[2], max_sequence_length)
    else:
        tokens = np.zeros((batch, max_sequence_length, joint_width), np.float32)
    # Diffusers pads with F.pad, whose negative amount crops: a CLIP width above the T5 one is cut, not refused.
    width = tokens.shape[-1]
    clip = clip[..., :width] if clip.shape[-1] >= width else np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
    return FlowEmbeddings(np.concatenate([clip, tokens], axis=1).astype(np.float32),
                          np.concatenate(pooled, axis=-1).astype(np.float32))


def encode_flux(clip: TextEncoder, t5: T5TextEncoder, prompts: list[str], prompts_2: list[str],
                max_sequence_length: int) -> FlowEmbeddings:
    """FLUX's conditioning: CLIP's pooled output of `prompts`, T5 tokens of `prompts_2`."""
    encoding = clip(prompts)
    if encoding.pooler_output is None:
        raise PackageError("FLUX's CLIP text encoder needs a `pooler_output` output (CLIPTextModel); re-export it")
    return FlowEmbeddings(t5(prompts_2, max_sequence_length), encoding.pooler_output.astype(np.float32))
