"""Weighted, long prompts (`prompt_weighting="a1111"`): AUTOMATIC1111's emphasis and 75-token chunks.

Every prompt of a call (positives and negatives together) is cut into chunks, shorter ones padded with empty chunks
to the same count so the UNet's positive and negative halves line up; each chunk is encoded on its own, the chosen
hidden state is multiplied token by token by its weight and rescaled to keep its mean (A1111's "Original" emphasis),
and the chunks are concatenated along the sequence. SDXL's pooled embedding comes from the first chunk, unweighted.

One difference from A1111, on purpose: the mean is kept per prompt and chunk, where A1111 takes it over its whole
batch. With one prompt (A1111's usual case) the two agree; per prompt, an image never depends on what else shares
its batch, which the server's dynamic batching relies on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from diffrt.errors import InputError, PackageError, invalid
from diffrt.runtime.pipelines.prompts import TextEncoder, TextEncoding, clip_skip_embeds
from diffrt.runtime.prompt_chunks import CHUNK_LENGTH, CHUNK_TOKENS, pad_chunks, prompt_chunks

DEFAULT_MAX_CHUNKS = 8  # the UNet sequence limit diffrt exports (8 x 77 tokens); packages may record their own


@dataclass
class WeightedEncoding:
    """The text encoder's outputs for every chunk of every prompt (rows = prompt-major, chunk-minor)."""

    encoding: TextEncoding
    weights: np.ndarray  # [prompts * chunks, 77]
    chunks: int

    def embeddings(self, select: Callable[[TextEncoding], np.ndarray]) -> np.ndarray:
        """The selected hidden state, emphasised, as [prompts, chunks * 77, channels]."""
        hidden = select(self.encoding)
        weighted = emphasize(hidden, self.weights)
        return weighted.reshape(hidden.shape[0] // self.chunks, self.chunks * CHUNK_LENGTH, hidden.shape[-1])

    def pooled(self) -> np.ndarray | None:
        """Each prompt's first-chunk pooled projection (what SDXL conditions on); None if the encoder has none."""
        pooled = self.encoding.pooled
        return None if pooled is None else pooled[:: self.chunks]


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each token's embedding times its weight, the chunk rescaled to its original mean (weights of 1: unchanged)."""
    original = hidden.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    weighted = hidden * weights[..., None]
    rescale = original / weighted.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    return (weighted * rescale).astype(hidden.dtype)


def encode_weighted(
    encoder: TextEncoder,
    texts: Sequence[str],
    names: Sequence[str],
    max_chunks: int,
    min_chunks: int = 1,
) -> WeightedEncoding:
    """Chunk `texts` (A1111 syntax; `names` the argument each came from, for errors), pad them to one chunk count,
    and run the text encoder over all chunks. The chunk count is checked against `max_chunks` before any engine runs."""
    chunked = [prompt_chunks(encoder.tokenizer, text) for text in texts]
    count = max([min_chunks, *(c.count for c in chunked)])
    if count > max_chunks:
        longest = max(range(len(chunked)), key=lambda i: chunked[i].count)
        raise InputError(
            f"`{names[longest]}` needs {chunked[longest].count} chunks of {CHUNK_TOKENS} tokens; this package's "
            f"UNet takes at most {max_chunks} ({max_chunks * CHUNK_TOKENS} tokens): shorten it"
        )
    padded = [pad_chunks(c, count, encoder.tokenizer) for c in chunked]
    ids = np.concatenate([p.ids for p in padded])
    weights = np.concatenate([p.weights for p in padded])
    return WeightedEncoding(encoder.encode_ids(ids), weights, count)


def chunk_count(embeds: np.ndarray, name: str) -> int:
    """How many 77-token chunks an embeddings array the user passed holds (so a negative prompt can match it)."""
    length = int(embeds.shape[1])
    if length % CHUNK_LENGTH:
        raise invalid(name, f"a sequence length that is a multiple of {CHUNK_LENGTH} with prompt_weighting", length)
    return length // CHUNK_LENGTH



def encode_sd_weighted(
    encoder: TextEncoder,
    prompts: list[str] | None,
    negatives: list[str] | None,
    prompt_embeds: np.ndarray | None,
    clip_skip: int | None,
    max_chunks: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """SD 1.x / 2.x: (prompt embeddings, negative embeddings or None), prompts encoded unless `prompt_embeds` is
    given. Clip skip applies to both sides, as in A1111."""
    texts = [*((prompts or []) if prompt_embeds is None else []), *(negatives or [])]
    names = ["prompt"] * (len(texts) - len(negatives or [])) + ["negative_prompt"] * len(negatives or [])
    given_chunks = 1 if prompt_embeds is None else chunk_count(prompt_embeds, "prompt_embeds")
    encoded = encode_weighted(encoder, texts, names, max_chunks, given_chunks)
    if prompt_embeds is not None and encoded.chunks > given_chunks:
        raise InputError(f"`negative_prompt` needs {encoded.chunks} chunks but `prompt_embeds` holds "
                         f"{given_chunks}: encode both with `encode_prompt` instead")

    def select(encoding: TextEncoding) -> np.ndarray:
        return encoding.last_hidden_state if clip_skip is None else clip_skip_embeds(encoding, clip_skip)

    embeds = encoded.embeddings(select)
    if prompt_embeds is not None:
        return prompt_embeds, embeds if negatives else None
    count = len(texts) - len(negatives or [])
    return embeds[:count], (embeds[count:] if negatives else None)


def encode_sdxl_weighted(
    encoders: list[TextEncoder],
    prompts: list[list[str]] | None,
    negatives: list[list[str]] | None,
    clip_skip: int | None,
    max_chunks: int,
    given_chunks: int = 1,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """SDXL: each encoder's hidden state (clip skip as Diffusers: on the prompt; the penultimate layer for the
    negative), emphasised and concatenated along channels; the pooled projection of the first chunk.
    Returns (prompt_embeds, pooled, negative_embeds, negative_pooled); a side not asked for is None."""
    per_encoder: list[tuple[list[str], list[str]]] = []
    for i in range(len(encoders)):
        per_encoder.append((prompts[i] if prompts else [], negatives[i] if negatives else []))
    count = max([given_chunks, *(prompt_chunks(e.tokenizer, t).count for e, (p, n) in zip(encoders, per_encoder)
                                 for t in (*p, *n))])
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    positive, negative, pooled, negative_pooled = [], [], None, None
    for encoder, (texts, negative_texts) in zip(encoders, per_encoder):
        names = ["prompt"] * len(texts) + ["negative_prompt"] * len(negative_texts)
        encoded = encode_weighted(encoder, [*texts, *negative_texts], names, max_chunks, count)
        hidden = encoded.embeddings(lambda e: _layer(e, layer))
        penultimate = encoded.embeddings(lambda e: _layer(e, -2))
        positive.append(hidden[: len(texts)])
        negative.append(penultimate[len(texts):])
        if encoded.pooled() is not None:
            all_pooled = encoded.pooled()
            assert all_pooled is not None
            pooled, negative_pooled = all_pooled[: len(texts)], all_pooled[len(texts):]
    if pooled is None:
        raise PackageError("SDXL needs a text encoder with a `text_embeds` output (text_encoder_2)")
    return (np.concatenate(positive, axis=-1) if prompts else None, pooled if prompts else None,
            np.concatenate(negative, axis=-1) if negatives else None, negative_pooled if negatives else None)


def _layer(encoding: TextEncoding, layer: int) -> np.ndarray:
    if not -len(encoding.hidden_states) <= layer < 0:
        raise InputError(f"`clip_skip` is too large for a text encoder with {len(encoding.hidden_states) - 1} layers")
    return encoding.hidden_states[layer]
