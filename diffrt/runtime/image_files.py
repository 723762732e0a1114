"""Image files as AUTOMATIC1111 writes them, for every front end (`diffrt generate`, the HTTP server): decoding a
user's image safely, and encoding a result with its generation parameters.

Decoding: a file that is no image, a truncated one or a decompression bomb is an InputError naming where it came
from. Encoding: the generation parameters go where A1111 puts them: PNG text chunks (`parameters`: the infotext;
`diffrt`: diffrt's JSON), and for JPEG and WebP the EXIF UserComment ("UNICODE" + UTF-16BE, as A1111 writes it with
piexif). EXIF has no second text field A1111 reads, so diffrt's JSON is in PNGs only.
"""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import IO, Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from diffrt.errors import InputError

PARAMETERS_KEY = "parameters"  # A1111's PNG text key of the infotext
JSON_KEY = "diffrt"  # diffrt's full record of the call, as JSON
LOSSY_QUALITY = 95  # JPEG / WebP: generated images are end results, worth keeping close to the PNG
EXIF_IFD = 0x8769  # the Exif sub-IFD, where UserComment lives
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\0"  # EXIF character code of UserComment: UCS-2/UTF-16, big-endian as piexif writes it


def read_image(source: Path | IO[bytes], where: str, mode: str) -> Image.Image:
    """The image in `source` (a path or a binary file object), decoded and converted to `mode`; `where` names it in
    errors (e.g. "`--image` 'cat.png'"). Pillow's own pixel limit (MAX_IMAGE_PIXELS, about 89 million) is a hard
    limit here: above it Pillow only warns, and decoding a bomb can take all memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
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
