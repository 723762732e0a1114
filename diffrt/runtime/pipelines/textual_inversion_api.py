"""Diffusers' `load_textual_inversion` / `unload_textual_inversion` on a diffrt pipeline.

New tokens go into the pipeline's tokenizer; their vectors become new rows of the text encoder's token embedding,
an initializer override like LoRA's (`diffrt.runtime.adapters.state`), so only that text encoder's engine is
re-created. For SDXL pass `text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2` as with Diffusers, or load
an A1111 SDXL file (`clip_l` + `clip_g`) without them: each vector set goes to its encoder.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from diffrt.errors import ConfigError, InputError, invalid
from diffrt.runtime.adapters.textual_inversion import (
    DEFAULT_WEIGHT_NAME,
    TOKEN_EMBEDDING,
    _matrix,
    read_embedding,
    vector_tokens,
)
from diffrt.runtime.pipelines.lora_api import resolve_adapter_file

if TYPE_CHECKING:
    from diffrt.runtime.adapters.state import AdapterState
    from diffrt.runtime.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class TextualInversionMixin:
    """Mixed into `DiffusionPipeline` (after `LoraLoaderMixin`, whose engine refresh it reuses)."""

    adapters: "AdapterState"
    provider: Any

    def _refresh_adapted_engines(self) -> float:
        raise NotImplementedError  # LoraLoaderMixin

    def load_textual_inversion(self, pretrained_model_name_or_path: Any, token: str | Sequence[str] | None = None,
                               tokenizer: Any = None, text_encoder: Any = None, *, weight_name: str | None = None,
                               **hub: Any) -> None:
        """Load embeddings (a .safetensors file, a folder with `weight_name` / learned_embeds.safetensors, a Hub repo
        id, a NumPy array [n, hidden], or a list of these with a list of tokens) as `token`. Without `token`, the
        file's own token (Diffusers' format) or the file name (A1111's, as A1111 does)."""
        if isinstance(self.provider, str) and self.provider.lower() == "trt":
            raise ConfigError("textual inversion adds rows to the text encoder's token embedding, and TensorRT's "
                              "refit replaces weights' values, never their shapes: use provider 'cuda' (ONNX Runtime) "
                              "for embeddings")
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens: list[str | None] = list(token) if isinstance(token, (list, tuple)) \
            else [token if isinstance(token, str) else None] * len(sources)
        if len(tokens) != len(sources):
            raise invalid("token", f"one token per embedding ({len(sources)})", len(tokens))
        chosen = self._chosen_encoder(text_encoder, tokenizer)
        for source, name in zip(sources, tokens):
            self._load_one(source, name, chosen, weight_name, hub)
        self._refresh_adapted_engines()

    def unload_textual_inversion(self) -> None:
        """Remove every loaded embedding: the tokenizers and text encoders are the package's own again."""
        for component, tokenizer_name in TOKENIZER_OF.items():
            self.adapters.token_rows.pop(component, None)
            self.__dict__.pop(tokenizer_name, None)  # the cached tokenizer: read again from the package
        self._refresh_adapted_engines()

    def _chosen_encoder(self, text_encoder: Any, tokenizer: Any) -> str | None:
        if text_encoder is None and tokenizer is None:
            return None
        name = getattr(text_encoder, "name", None)
        if name not in TOKENIZER_OF:
            raise invalid("text_encoder", "pipe.text_encoder or pipe.text_encoder_2 (with its tokenizer)", text_encoder)
        if tokenizer is not None and tokenizer is not getattr(self, TOKENIZER_OF[name]):
            raise invalid("tokenizer", f"pipe.{TOKENIZER_OF[name]}, the tokenizer of {name}", tokenizer)
        return str(name)

    def _load_one(self, source: Any, token: str | None, chosen: str | None, weight_name: str | None,
                  hub: dict[str, Any]) -> None:
        vectors: dict[str | None, np.ndarray]
        if isinstance(source, np.ndarray):
            vectors = {None: _matrix("the embedding array", source)}
        else:
            path = resolve_adapter_file(source, weight_name or DEFAULT_WEIGHT_NAME, "embedding", **hub)
            named, vectors = read_embedding(path)
            token = token or named or path.stem
        if not token:
            raise invalid("token", "the token for an embedding given as an array", token)
        placed = self._place(vectors, chosen)
        for component, matrix in placed.items():
            self._add_rows(component, token, matrix)

    def _place(self, vectors: dict[str | None, np.ndarray], chosen: str | None) -> dict[str, np.ndarray]:
        if None in vectors:
            return {chosen or "text_encoder": vectors[None]}
        if chosen is not None:
            if chosen not in vectors:
                raise InputError(f"the embedding has no vectors for {chosen} (it has {', '.join(map(str, vectors))})")
            return {chosen: vectors[chosen]}
        return {component: matrix for component, matrix in vectors.items() if component is not None
                and self.adapters.weights.package.has(component)}

    def _add_rows(self, component: str, token: str, matrix: np.ndarray) -> None:
        placements = self.adapters.weights.placements(component)
        if TOKEN_EMBEDDING not in placements:
            raise InputError(f"the {component} of this package records no token embedding to extend")
        place = placements[TOKEN_EMBEDDING][0]
        table = self.adapters.weights.base(component, place.initializer)
        rows, width = (table.shape[0], table.shape[1]) if place.layout == "direct" else (table.shape[1], table.shape[0])
        if matrix.shape[1] != width:
            raise InputError(f"the embedding for {token!r} has vectors of {matrix.shape[1]} values; {component} takes "
                             f"{width} (an embedding for another model?)")
        tokenizer: CLIPTokenizer = getattr(self, TOKENIZER_OF[component])
        state = self.adapters.token_rows[component]
        names = vector_tokens(token, matrix.shape[0])
        ids = tokenizer.add_tokens(names, expansion=" ".join(names) if len(names) > 1 else None)
        expected = list(range(rows + len(state.tokens), rows + len(state.tokens) + len(names)))
        if ids != expected:
            raise InputError(f"{component}: the tokenizer gives {token!r} id {ids[0]}, but the token embedding's "
                             f"next row is {expected[0]}: the package's tokenizer and text encoder disagree on the "
                             "vocabulary")
        state.tokens.extend(names)
        state.vectors.extend(matrix)
        logger.info("textual inversion: %s = %d vector(s) in %s", token, len(names), component)

