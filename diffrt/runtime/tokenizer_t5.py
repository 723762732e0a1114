"""T5 tokenizer on the `tokenizers` library: the ids SD3 and FLUX give their T5 encoder, without transformers.

Diffusers' `_get_t5_prompt_embeds` calls `T5TokenizerFast(prompts, padding="max_length", max_length=
max_sequence_length, truncation=True, add_special_tokens=True)`: the SentencePiece (Unigram) pieces of the text,
cut to `max_length - 1`, then the end token `</s>`, then `<pad>` up to `max_length`. There is no start token.

The folder's `tokenizer.json` is the whole pipeline (normalizer, pre-tokenizer, Unigram model, `$A </s>`
post-processor). A package's is written by `diffrt.export.tokenizers.write_t5_tokenizer` as the exporting
transformers ran it (transformers 5 rebuilds a T5 pipeline from the checkpoint's file instead of running that file
as it is), so the two tokenize alike. The pad token comes from tokenizer_config.json / special_tokens_map.json.
The length is per call (SD3 256, FLUX 512 or 256), never baked into the file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders

from diffrt.errors import InputError, PackageError, invalid
from diffrt.package.files import read_json

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_SPECIAL_TOKENS = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
METASPACE = "\u2581"


@dataclass(frozen=True)
class T5Encoding:
    """Ids of a batch of prompts and what truncation removed from each (0 tokens / "" where nothing)."""

    ids: np.ndarray  # int64 [batch, max_length]
    truncated_tokens: tuple[int, ...]
    removed_text: tuple[str, ...]


def _special_tokens(folder: Path) -> dict[str, str]:
    """special_tokens_map.json overrides tokenizer_config.json, as transformers' loader merges them."""
    tokens = dict(DEFAULT_SPECIAL_TOKENS)
    for source in (read_json(folder / "tokenizer_config.json"), read_json(folder / "special_tokens_map.json")):
        for key in DEFAULT_SPECIAL_TOKENS:
            value = source.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[key] = value
    return tokens


class T5Tokenizer:
    """`tokenizer(texts, max_length) -> int64 ids [batch, max_length]`, as transformers' T5TokenizerFast pads and
    truncates them for SD3 / FLUX."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str]) -> None:
        tokenizer.no_truncation()  # the length is per call, never shared mutable state
        tokenizer.no_padding()
        if tokenizer.decoder is None:  # only for the truncation warning's text
            tokenizer.decoder = decoders.Metaspace(replacement=METASPACE)
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.pad_token_id = self._token_id("pad_token")
        self.eos_token_id = self._token_id("eos_token")
        self._num_special = tokenizer.num_special_tokens_to_add(False)

    @classmethod
    def from_folder(cls, path: str | Path) -> "T5Tokenizer":
        """A T5 tokenizer folder of a package (SD3's `tokenizer_3`, FLUX's `tokenizer_2`); needs tokenizer.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise PackageError(f"tokenizer folder {folder} does not exist")
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise PackageError(f"T5 tokenizer folder {folder} needs {TOKENIZER_FILE} (the runtime does not read "
                               "spiece.model; re-export the package to write it)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise PackageError(f"{tokenizer_file} is not a valid tokenizers file: {error}") from error
        return cls(tokenizer, _special_tokens(folder))

    def _token_id(self, name: str) -> int:
        token = self.special_tokens[name]
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise PackageError(f"the T5 tokenizer's {name} {token!r} is not in its vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokens(self, text: str) -> list[int]:
        """Ids of `text` alone: no end token, never truncated."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of one text with the end token; cut to `max_length` (keeping the end token) if given."""
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        if max_length is not None and len(encoding.ids) + self._num_special > max_length:
            encoding.truncate(max_length - self._num_special)
        return list(self._tokenizer.post_process(encoding).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=False))

    def tokenize(self, texts: str | Sequence[str], max_length: int) -> T5Encoding:
        """Ids [batch, max_length] and, per text, how many tokens truncation cut off and their text; logs the cut
        text as a warning, as Diffusers does."""
        batch = self._check_texts(texts)
        minimum = max(1, self._num_special)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < minimum:
            raise invalid("max_length", f"an integer >= {minimum}", max_length)
        ids = np.full((len(batch), max_length), self.pad_token_id, dtype=np.int64)
        counts, removed = [], []
        for row, text in enumerate(batch):
            full = self.encode(text)
            kept = self.encode(text, max_length) if len(full) > max_length else full
            ids[row, : len(kept)] = kept
            cut = full[len(kept) - self._num_special : len(full) - self._num_special] if len(full) > len(kept) else []
            counts.append(len(cut))
            removed.append(self.decode(cut) if cut else "")
        if any(counts):
            logger.warning("The following part of your input was truncated because `max_sequence_length` is set to "
                           "%d tokens: %s", max_length, [text for text in removed if text])
        return T5Encoding(ids, tuple(counts), tuple(removed))

    def __call__(self, texts: str | Sequence[str], max_length: int) -> np.ndarray:
        """int64 ids [batch, max_length]: like `T5TokenizerFast(texts, padding="max_length",
        max_length=max_length, truncation=True, add_special_tokens=True).input_ids` (cut text logged)."""
        return self.tokenize(texts, max_length).ids

    def _check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            return list(texts)
        got = f"{type(texts).__name__} {texts!r}" if not isinstance(texts, (list, tuple)) else repr(texts)[:80]
        raise InputError(f"`texts` must be a string or a non-empty list of strings; got {got}")

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab_size={self.vocab_size}, pad_token={self.special_tokens['pad_token']!r})"
