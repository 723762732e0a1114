"""CLIP tokenizer on the `tokenizers` library: the ids transformers' `CLIPTokenizer` gives, without transformers.

`CLIPTokenizer.from_folder` reads `tokenizer.json`, or builds the same byte-level BPE from `vocab.json` +
`merges.txt` (Optimum packages ship only those) with CLIP's normalizer (NFC, whitespace runs to one space,
lowercase), pre-tokenizer and `<|startoftext|> ... <|endoftext|>` post-processor. The special tokens come from
`special_tokens_map.json` / `tokenizer_config.json`; SD 2.x and SDXL's `tokenizer_2` pad with "!".
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from diffrt.errors import InputError, PackageError, invalid
from diffrt.package.files import read_json

logger = logging.getLogger(__name__)

DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
DEFAULT_MAX_LENGTH = 77
# CLIP's word pattern (OpenAI's `clip/simple_tokenizer.py`), as transformers' fast CLIP tokenizer uses it.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
END_OF_WORD = "</w>"
PADDINGS = ("max_length", "longest")


def _token_text(value: Any) -> str | None:
    """A special token as saved by transformers: a string or {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(folder: Path) -> dict[str, str]:
    """special_tokens_map.json overrides tokenizer_config.json, as transformers' loader merges them."""
    config = read_json(folder / "tokenizer_config.json")
    special_map = read_json(folder / "special_tokens_map.json")
    tokens = dict(DEFAULT_SPECIAL_TOKENS)
    for source in (config, special_map):
        for key in DEFAULT_SPECIAL_TOKENS:
            text = _token_text(source.get(key))
            if text is not None:
                tokens[key] = text
    return tokens


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise PackageError(f"{path}: each merge line must be two symbols separated by a space; got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_clip_bpe(vocab_file: Path, merges_file: Path, special: dict[str, str]) -> Tokenizer:
    """The CLIP tokenizer from `vocab.json` + `merges.txt`, configured as transformers' `CLIPTokenizer` does."""
    vocab = read_json(vocab_file)
    model = BPE(
        vocab=vocab, merges=_read_merges(merges_file), dropout=None, continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=special["unk_token"],
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    bos, eos = special["bos_token"], special["eos_token"]
    ids = {}
    for name, token in (("bos_token", bos), ("eos_token", eos)):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise PackageError(f"{vocab_file}: the {name} {token!r} is not in the vocabulary")
        ids[token] = token_id
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, ids[eos]), (bos, ids[bos]), trim_offsets=False, add_prefix_space=False,
    )
    return tokenizer


class CLIPTokenizer:
    """`tokenizer(texts) -> int64 ids [batch, 77]`, padded and truncated exactly as transformers' CLIPTokenizer."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str], model_max_length: int) -> None:
        tokenizer.no_truncation()  # truncation and padding are done per call, never as shared mutable state
        tokenizer.no_padding()
        # transformers registers every special token as an unsplittable added token, so a "!" pad token in the
        # text is its own token ("!" id) rather than part of a BPE word ("!</w>"): do the same.
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(special_tokens.values())]
        )
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.model_max_length = model_max_length
        self.pad_token_id = self._token_id("pad_token")
        self.eos_token_id = self._token_id("eos_token")
        self.bos_token_id = self._token_id("bos_token")
        self._num_special = tokenizer.num_special_tokens_to_add(False)
        #: multi-vector textual-inversion tokens: "tok" -> "tok tok_1 tok_2" (Diffusers' maybe_convert_prompt)
        self._expansions: dict[str, str] = {}

    @classmethod
    def from_folder(cls, path: str | Path) -> "CLIPTokenizer":
        """A tokenizer folder of a package or diffusers checkpoint (`tokenizer/`, `tokenizer_2/`)."""
        folder = Path(path)
        if not folder.is_dir():
            raise PackageError(f"tokenizer folder {folder} does not exist")
        special = _special_tokens(folder)
        tokenizer_file = folder / "tokenizer.json"
        if tokenizer_file.is_file():
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer_file))
            except Exception as error:  # tokenizers raises a bare Exception for malformed files
                raise PackageError(f"{tokenizer_file} is not a valid tokenizers file: {error}") from error
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tokenizer = build_clip_bpe(folder / "vocab.json", folder / "merges.txt", special)
        else:
            raise PackageError(f"tokenizer folder {folder} needs tokenizer.json, or vocab.json and merges.txt")
        max_length = read_json(folder / "tokenizer_config.json").get("model_max_length", DEFAULT_MAX_LENGTH)
        # transformers saves a huge sentinel (1e30) when no maximum was set; CLIP's context is 77 tokens.
        if not isinstance(max_length, int) or not 2 <= max_length <= 1_000_000:
            max_length = DEFAULT_MAX_LENGTH
        return cls(tokenizer, special, max_length)

    def _token_id(self, name: str) -> int:
        token = self.special_tokens[name]
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise PackageError(f"the tokenizer's {name} {token!r} is not in its vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def add_tokens(self, tokens: Sequence[str], expansion: str | None = None) -> list[int]:
        """Add `tokens` (textual inversion) as transformers' `add_tokens` does: unsplittable, matched after
        normalisation; their ids follow the vocabulary. With `expansion`, prompts mentioning `tokens[0]` use all of
        them (a multi-vector embedding). InputError for a token the vocabulary has already."""
        taken = [token for token in tokens if self._tokenizer.token_to_id(token) is not None]
        if taken:
            raise invalid("token", "a token not in the tokenizer's vocabulary yet", taken[0])
        self._tokenizer.add_tokens([AddedToken(token, normalized=True, special=False) for token in tokens])
        if expansion is not None:
            self._expansions[tokens[0]] = expansion
        return [int(self._tokenizer.token_to_id(token) or 0) for token in tokens]

    def expand(self, text: str) -> str:
        """`text` with each multi-vector token written out as all its tokens."""
        for token, expansion in self._expansions.items():
            if token in text:  # not inside an already written-out "tok_1"
                text = re.sub(re.escape(token) + r"(?!_\d)", lambda _: expansion, text)
        return text

    def tokens(self, text: str) -> list[int]:
        """Ids of `text` alone: no start or end token, never truncated (the pieces of a long, weighted prompt)."""
        return list(self._tokenizer.encode(self.expand(text), add_special_tokens=False).ids)

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. ",</w>"), None if the vocabulary lacks it."""
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of one text with start and end tokens; cut to `max_length` (keeping the end token) if given."""
        encoding = self._tokenizer.encode(self.expand(text), add_special_tokens=False)
        if max_length is not None and len(encoding.ids) + self._num_special > max_length:
            encoding.truncate(max_length - self._num_special)
        return list(self._tokenizer.post_process(encoding).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, with CLIP's end-of-word markers turned back into spaces (as transformers decodes)."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        return text.replace(END_OF_WORD, " ").strip()

    def untruncated_ids(self, texts: str | Sequence[str]) -> np.ndarray:
        """All ids of each text, padded to the longest: what Diffusers compares against to warn of truncation."""
        return self(texts, padding="longest", truncation=False)

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int | None = None,
        padding: str = "max_length",
        truncation: bool = True,
    ) -> np.ndarray:
        """int64 ids [batch, max_length]: start token, text, end token, then pad tokens.

        Like `CLIPTokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids`; a text longer
        than `max_length` is cut (keeping the end token) and the cut-off text is logged as a warning.
        """
        batch = self._check_texts(texts)
        max_length = self.model_max_length if max_length is None else max_length
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < self._num_special + 1:
            raise invalid("max_length", f"an integer >= {self._num_special + 1}", max_length)
        if padding not in PADDINGS:
            raise invalid("padding", f"one of {', '.join(PADDINGS)}", padding)
        full = [self.encode(text) for text in batch]
        rows = full
        if truncation:
            rows = [self.encode(text, max_length) if len(ids) > max_length else ids for text, ids in zip(batch, full)]
            self._warn_truncated(full, max_length)
        width = max(len(ids) for ids in rows)
        if padding == "max_length":
            width = max(width, max_length)
        out = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = ids
        return out

    def _check_texts(self, texts: Any) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            return list(texts)
        got = f"{type(texts).__name__} {texts!r}" if not isinstance(texts, (list, tuple)) else repr(texts)[:80]
        raise InputError(f"`texts` must be a string or a non-empty list of strings; got {got}")

    def _warn_truncated(self, full: list[list[int]], max_length: int) -> None:
        # The removed part is what Diffusers reports: the tokens between position max_length - 1 and the end token.
        removed = [self.decode(ids[max_length - 1 : -1]) for ids in full if len(ids) > max_length]
        if removed:
            logger.warning(
                "The following part of your input was truncated because CLIP can only handle sequences up to "
                "%d tokens: %s", max_length, removed,
            )

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
            f"pad_token={self.special_tokens['pad_token']!r})"
        )
