"""Image files of the command line: reading the user's inputs, writing results with their parameters.

Reading: a missing file, a file that is no image, a truncated one or a decompression bomb is an InputError naming
the option and the file. Writing: the format is the one the extension names, the bytes are made in memory and put
in place atomically (`diffrt.package.files.write_bytes`: no half-written image, no temp file left on failure), and
an existing file is replaced only with `--overwrite`. The generation parameters go where AUTOMATIC1111 puts them:
PNG text chunks (`parameters`: the infotext; `diffrt`: diffrt's JSON), and for JPEG and WebP the EXIF UserComment
("UNICODE" + UTF-16BE, as A1111 writes it with piexif). EXIF has no second text field A1111 reads, so diffrt's JSON
is in PNGs only.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from diffrt.errors import InputError
from diffrt.package.files import write_bytes

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
PARAMETERS_KEY = "parameters"  # A1111's PNG text key of the infotext
JSON_KEY = "diffrt"  # diffrt's full record of the call, as JSON
LOSSY_QUALITY = 95  # JPEG / WebP: generated images are end results, worth keeping close to the PNG
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\0"  # EXIF character code of UserComment: UCS-2/UTF-16, big-endian as piexif writes it


def open_image(path: Path, option: str, mode: str) -> Image.Image:
    """The image at `path`, decoded and converted to `mode`. Pillow's own pixel limit (MAX_IMAGE_PIXELS, about
    89 million) is a hard limit here: above it Pillow only warns, and decoding a bomb can take all memory."""
    where = f"`{option}` {os.fsdecode(path)!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{where} is larger than {Image.MAX_IMAGE_PIXELS} pixels, the most diffrt reads (a "
                         "decompression bomb, or an image to shrink first)") from None
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{where} is a folder; expected an image file") from None
    except UnidentifiedImageError:
        raise InputError(f"{where} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data (Pillow raises all three)
        raise InputError(f"{where} cannot be read as an image: {error}") from None


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


def encode_image(image: Image.Image, image_format: str, infotext: str, record: dict[str, Any]) -> bytes:
    """The file's bytes: the image in `image_format` with the infotext (and, in PNG, the JSON record)."""
    import json

    buffer = io.BytesIO()
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, infotext)  # tEXt, or iTXt (UTF-8) when the text is not Latin-1
        info.add_text(JSON_KEY, json.dumps(record, ensure_ascii=False, default=str))
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        exif = exif_user_comment(UNICODE_PREFIX + infotext.encode("utf-16-be", "replace"))
        image.convert("RGB").save(buffer, format=image_format, quality=LOSSY_QUALITY, exif=exif)
    return buffer.getvalue()


def exif_user_comment(comment: bytes) -> bytes:
    """An EXIF block holding only UserComment, typed UNDEFINED as the EXIF standard says. Written by hand because
    Pillow's `Image.Exif` types a bytes value it has no type for as BYTE, which piexif (A1111's reader) hands back
    as a tuple of ints that it cannot decode. Layout: little-endian TIFF header, IFD0 with one entry (the Exif IFD
    pointer), the Exif IFD with one entry (UserComment), then the comment's bytes."""
    exif_ifd = 8 + 2 + 12 + 4  # header, IFD0 (count, one entry, next-IFD offset)
    data = exif_ifd + 2 + 12 + 4
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", EXIF_IFD, 4, 1, exif_ifd) + struct.pack("<I", 0)
    ifd1 = struct.pack("<H", 1) + struct.pack("<HHII", USER_COMMENT, 7, len(comment), data) + struct.pack("<I", 0)
    return b"Exif\0\0" + b"II" + struct.pack("<HI", 42, 8) + ifd0 + ifd1 + comment


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
