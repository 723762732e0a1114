"""Textual-inversion embedding files -> token vectors, torch-free (safetensors only).

Formats: AUTOMATIC1111 (`emb_params` [n, hidden]; SDXL: `clip_l` [n, 768] for text_encoder and `clip_g` [n, 1280]
for text_encoder_2) and Diffusers (`learned_embeds.safetensors`: {token: [hidden] or [n, hidden]}). An embedding of
n vectors becomes n tokens, `tok`, `tok_1`, ... `tok_{n-1}`, and prompts naming `tok` use them all, as Diffusers'
`load_textual_inversion` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffrt.errors import InputError
from diffrt.runtime.adapters.safetensors_file import read_safetensors

TOKEN_EMBEDDING = "text_model.embeddings.token_embedding.weight"
DEFAULT_WEIGHT_NAME = "learned_embeds.safetensors"  # Diffusers' textual inversion training output
SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}  # A1111's SDXL embeddings


def read_embedding(path: Path) -> tuple[str | None, dict[str | None, np.ndarray]]:
    """(the token the file names or None, {component or None for "any": vectors [n, hidden]})."""
    tensors, _ = read_safetensors(path)
    if "emb_params" in tensors:
        return None, {None: _matrix(path, tensors["emb_params"])}
    if set(tensors) & set(SDXL_KEYS):
        return None, {SDXL_KEYS[key]: _matrix(path, value) for key, value in tensors.items() if key in SDXL_KEYS}
    if len(tensors) == 1:
        token, value = next(iter(tensors.items()))
        return token, {None: _matrix(path, value)}
    raise InputError(f"{path} is not a textual-inversion embedding diffrt reads (expected `emb_params`, `clip_l` / "
                     f"`clip_g`, or one token's vectors); it holds {', '.join(list(tensors)[:5])}")


def _matrix(path: Path | str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 1:
        value = value[None]
    if value.ndim != 2 or not value.shape[0] or not np.isfinite(value).all():
        raise InputError(f"{path}: an embedding must be finite vectors [n, hidden]; got shape {value.shape}")
    return value


def vector_tokens(token: str, count: int) -> list[str]:
    """`tok`, `tok_1`, ... for an embedding of `count` vectors (Diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]
