"""Tokenizer folders of a package: the checkpoint's files as they are, plus a complete `tokenizer.json`.

The original vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json are copied unchanged (the
pad token lives there: "!" for SD 2.x and SDXL's tokenizer_2, "<|endoftext|>" otherwise). `tokenizer.json` is
the checkpoint's own when it has one, else the one transformers' CLIP tokenizer writes for these files; in both
it gains the padding and truncation every SD pipeline applies (`padding="max_length", max_length=77,
truncation=True`, with the checkpoint's pad token), so `tokenizers.Tokenizer.from_file(...).encode(prompt).ids`
alone gives the 77 ids the text encoder expects. vocab.json / merges.txt are derived from it when the checkpoint
lacks them (transformers 5 saves only tokenizer.json), for readers that build the BPE from those two files.

T5 (SD3's `tokenizer_3`, FLUX's `tokenizer_2`), `write_t5_tokenizer`: tokenizer.json is the pipeline the exporting
transformers' T5TokenizerFast runs for the checkpoint, read from its tokenizer.json, or converted from spiece.model
when it has none. That is not always the checkpoint's file verbatim: transformers 5 keeps only the file's Unigram
vocabulary and SentencePiece charsmap and rebuilds the rest (whitespace split + Metaspace pre-tokenizer, `$A </s>`),
so a verbatim copy would tokenize whitespace runs differently from Diffusers. No padding or truncation is baked in:
the length is per call (`max_sequence_length`). tokenizer_config.json / special_tokens_map.json are copied (the pad
and end tokens); spiece.model is not: the runtime reads tokenizer.json only, and transformers loads the folder from
tokenizer.json too.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from diffrt.errors import ExportError
from diffrt.package.files import copy_file, write_text

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

T5_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ORIGINAL_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TOKENIZER_JSON = "tokenizer.json"
SPIECE_MODEL = "spiece.model"  # T5's SentencePiece model, which transformers converts when tokenizer.json is absent


def write_tokenizer(source: Path, target: Path) -> None:
    """Copy the tokenizer folder `source` to `target`, completing tokenizer.json as described above."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    try:
        reference = CLIPTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as error:
        raise ExportError(f"cannot read the CLIP tokenizer in {source}: {error}") from error
    target.mkdir(parents=True, exist_ok=True)
    for name in ORIGINAL_FILES:
        if (source / name).is_file():
            copy_file(source / name, target / name)
    original = source / TOKENIZER_JSON
    backend = Tokenizer.from_file(str(original)) if original.is_file() else _backend_of(reference)
    length = int(reference.model_max_length)
    backend.enable_truncation(max_length=length)
    backend.enable_padding(length=length, pad_id=int(reference.pad_token_id), pad_token=str(reference.pad_token))
    write_text(target / TOKENIZER_JSON, backend.to_str(pretty=True))
    if not (target / "vocab.json").is_file() or not (target / "merges.txt").is_file():
        _save_bpe_files(backend, target)


def write_t5_tokenizer(source: Path, target: Path) -> None:
    """Write the T5 tokenizer folder `source` to `target`: tokenizer.json as transformers runs it (see above),
    plus the special-token configs. ExportError if transformers cannot read `source` as a T5 tokenizer."""
    # transformers 4: the fast T5 class; 5: an alias of T5Tokenizer (a `tokenizers` backend), not in its stubs
    from transformers import T5TokenizerFast  # type: ignore[attr-defined,unused-ignore]

    if not (source / TOKENIZER_JSON).is_file() and not (source / SPIECE_MODEL).is_file():
        # transformers 5 would build a tokenizer of special tokens only from an empty folder, silently
        raise ExportError(f"cannot read the T5 tokenizer in {source}: it has neither {TOKENIZER_JSON} nor "
                          f"{SPIECE_MODEL}")
    try:
        reference = T5TokenizerFast.from_pretrained(str(source))
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise ExportError(f"cannot read the T5 tokenizer in {source}: {error}") from error
    backend = _backend_of(reference)
    backend.no_padding()
    backend.no_truncation()
    target.mkdir(parents=True, exist_ok=True)
    for name in T5_CONFIG_FILES:
        if (source / name).is_file():
            copy_file(source / name, target / name)
    write_text(target / TOKENIZER_JSON, backend.to_str(pretty=True))


def _backend_of(reference: object) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a transformers tokenizer (a copy, so settings stay local)."""
    from tokenizers import Tokenizer

    backend = getattr(reference, "backend_tokenizer", None) or getattr(reference, "_tokenizer", None)
    if backend is None:
        raise ExportError(f"transformers' {type(reference).__name__} has no `tokenizers` backend to write "
                          "tokenizer.json from")
    return Tokenizer.from_str(backend.to_str())


def _save_bpe_files(backend: Tokenizer, target: Path) -> None:
    """vocab.json + merges.txt from the BPE model of tokenizer.json (written only where missing)."""
    with tempfile.TemporaryDirectory(prefix=".bpe-", dir=target) as scratch:
        written = [Path(p) for p in backend.model.save(scratch)]
        for path in written:
            if not (target / path.name).is_file():
                copy_file(path, target / path.name)
