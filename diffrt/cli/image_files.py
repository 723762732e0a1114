"""Image files of the command line: reading the user's inputs, writing results with their parameters.

Reading: a missing file, a file that is no image, a truncated one or a decompression bomb is an InputError naming
the option and the file. Writing: the format is the one the extension names, the bytes are made in memory and put
in place atomically (`diffrt.package.files.write_bytes`: no half-written image, no temp file left on failure), and
an existing file is replaced only with `--overwrite`. The generation parameters go where AUTOMATIC1111 puts them:
PNG text chunks (`parameters`: the infotext; `diffrt`: diffrt's JSON), and for JPEG and WebP the EXIF UserComment
("UNICODE" + UTF-16BE, as A1111 writes it with piexif). EXIF has no second text field A1111 reads, so diffrt's JSON
is in PNGs only. The format itself (decoding safely, the metadata) is `diffrt.runtime.image_files`, shared with
the HTTP server.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from diffrt.errors import InputError
from diffrt.package.files import write_bytes
from diffrt.runtime.image_files import (  # noqa: F401 - the CLI's names of the shared format
    EXIF_IFD,
    JSON_KEY,
    PARAMETERS_KEY,
    UNICODE_PREFIX,
    USER_COMMENT,
    encode_image,
    exif_user_comment,
    read_image,
)

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def open_image(path: Path, option: str, mode: str) -> Image.Image:
    """The image at `path`, decoded and converted to `mode` (errors name the option and the file)."""
    return read_image(path, f"`{option}` {os.fsdecode(path)!r}", mode)


def output_format(path: Path) -> str:
    """The Pillow format an output's extension names; InputError listing the known extensions."""
    name = FORMATS.get(path.suffix.lower())
    if name is None:
        raise InputError(f"`--output` must end in one of {', '.join(FORMATS)} (the format to write); got "
                         f"{os.fsdecode(path)!r}")
    return name


def output_paths(output: Path, seeds: Sequence[int]) -> list[Path]:
    """`output` itself for one image; `NAME-SEED.EXT` for several, so each file says how to make it again."""
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{seed}{output.suffix}") for seed in seeds]


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that could not be written: an unknown extension, a folder, a place under
    something that is not a folder, a folder we may not write to, or an existing file without `--overwrite`."""
    where = f"`--output` {os.fsdecode(path)!r}"
    if path.is_dir():
        raise InputError(f"{where} is a folder; name the image file to write (e.g. {os.fsdecode(path / 'image.png')})")
    output_format(path)
    if path.exists() and not overwrite:
        raise InputError(f"{where} exists; pass --overwrite to replace it")
    parent = path.parent.absolute()
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{where} cannot be written: {os.fsdecode(existing)} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{where} cannot be written: no permission to write in {os.fsdecode(existing)}")


def write_image(image: Image.Image, path: Path, infotext: str, record: dict[str, Any], overwrite: bool) -> None:
    """Write one result atomically; the existence check runs again right before (the file may have appeared while
    the image was being made)."""
    data = encode_image(image, output_format(path), infotext, record)
    if path.exists() and not overwrite:
        raise InputError(f"`--output` {os.fsdecode(path)!r} exists; pass --overwrite to replace it")
    try:
        write_bytes(path, data)
    except OSError as error:
        raise InputError(f"`--output` {os.fsdecode(path)!r} cannot be written: {error.strerror or error}") from None


def read_parameters(path: Path) -> tuple[str, dict[str, Any]]:
    """(the infotext, diffrt's JSON record or {}) of an image file: PNG text chunks, or the EXIF UserComment of a
    JPEG / WebP. InputError when the file has no infotext."""
    import json

    where = f"`--from-png` {os.fsdecode(path)!r}"
    try:
        with warnings.catch_warnings():  # only the header and metadata are read: a large image is no danger here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                text_chunks = dict(getattr(image, "text", {}) or {})
                exif = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except Image.DecompressionBombError:
        raise InputError(f"{where} is larger than Pillow's decompression-bomb limit: no image diffrt made") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{where} is not an image Pillow can read: {error}") from None
    infotext = text_chunks.get(PARAMETERS_KEY) or _user_comment(exif)
    if not infotext:
        raise InputError(f"{where} has no generation parameters (no PNG `{PARAMETERS_KEY}` text, no EXIF "
                         "UserComment)")
    try:
        record = json.loads(text_chunks.get(JSON_KEY) or "{}")
    except json.JSONDecodeError:
        record = {}  # the infotext is what counts; the JSON only adds what it cannot say
    return infotext, record if isinstance(record, dict) else {}


def _user_comment(value: Any) -> str | None:
    """EXIF UserComment: an 8-byte character code, then the text (A1111 writes UNICODE; ASCII is read too)."""
    if not isinstance(value, bytes) or len(value) <= 8:
        return None
    code, body = value[:8], value[8:]
    if code == UNICODE_PREFIX:
        return body.decode("utf-16-be", "replace")
    return body.decode("utf-8", "replace").rstrip("\0")
