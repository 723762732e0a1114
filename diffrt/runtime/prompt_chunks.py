"""AUTOMATIC1111's long-prompt rule: a weighted prompt -> 77-token CLIP chunks with one weight per token.

Each chunk holds 75 prompt tokens between the start and end tokens and is encoded on its own; the UNet sees the
chunks' embeddings concatenated along the sequence. A chunk ends early at BREAK, and when a chunk fills up within
`COMMA_BACKTRACK` tokens of a comma, the words after that comma move to the next chunk (A1111's default
"comma padding backtrack" of 20), so a phrase is not cut in two.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffrt.runtime.prompt_syntax import parse_prompt
from diffrt.runtime.tokenizer import CLIPTokenizer

CHUNK_TOKENS = 75  # prompt tokens per chunk; with the start and end tokens, CLIP's 77
CHUNK_LENGTH = CHUNK_TOKENS + 2
COMMA_BACKTRACK = 20


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class PromptChunks:
    """One prompt's chunks: ids and per-token weights, each [chunks, 77]."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])


def prompt_chunks(tokenizer: CLIPTokenizer, prompt: str) -> PromptChunks:
    """Split `prompt` (A1111 syntax) into chunks of ids and weights, as A1111's `tokenize_line` does."""
    comma = tokenizer.token_id(",</w>")
    chunks: list[_Chunk] = []
    chunk = _Chunk()
    last_comma = -1

    def close_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = _Chunk(), -1

    for fragment in parse_prompt(prompt):
        if fragment.is_break:
            close_chunk()
            continue
        for token in tokenizer.tokens(fragment.text):
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == CHUNK_TOKENS and last_comma != -1 and \
                    len(chunk.tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = _Chunk(chunk.tokens[cut:], chunk.weights[cut:])
                del chunk.tokens[cut:], chunk.weights[cut:]
                close_chunk()
                chunk = moved
            if len(chunk.tokens) == CHUNK_TOKENS:
                close_chunk()
            chunk.tokens.append(token)
            chunk.weights.append(fragment.weight)
    if chunk.tokens or not chunks:
        close_chunk()
    rows = [_framed(tokenizer, c) for c in chunks]
    return PromptChunks(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))


def empty_chunk(tokenizer: CLIPTokenizer) -> PromptChunks:
    """The chunk that pads a shorter prompt to the chunk count of the longest in a call (A1111's `empty_chunk`)."""
    ids, weights = _framed(tokenizer, _Chunk())
    return PromptChunks(ids[None], weights[None])


def pad_chunks(chunks: PromptChunks, count: int, tokenizer: CLIPTokenizer) -> PromptChunks:
    missing = count - chunks.count
    if missing <= 0:
        return chunks
    empty = empty_chunk(tokenizer)
    return PromptChunks(np.concatenate([chunks.ids, np.repeat(empty.ids, missing, 0)]),
                        np.concatenate([chunks.weights, np.repeat(empty.weights, missing, 0)]))


def _framed(tokenizer: CLIPTokenizer, chunk: _Chunk) -> tuple[np.ndarray, np.ndarray]:
    """Start token, the 75 tokens (end tokens after the text, then the pad token where it differs: SD 2 / SDXL's
    second encoder pad with "!"), end token; weights 1 outside the text. Exactly Diffusers' ids for a short prompt."""
    ids = np.full(CHUNK_LENGTH, tokenizer.pad_token_id, dtype=np.int64)
    text = len(chunk.tokens)
    ids[0], ids[1 : 1 + text], ids[1 + text] = tokenizer.bos_token_id, chunk.tokens, tokenizer.eos_token_id
    weights = np.ones(CHUNK_LENGTH, dtype=np.float32)
    weights[1 : 1 + text] = chunk.weights
    return ids, weights
