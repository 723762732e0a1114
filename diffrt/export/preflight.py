"""Checks of the source's weight files before the first component is exported.

A truncated download or a file with a garbage header would otherwise be found only when its component is loaded,
after the components before it were exported (minutes for a real model). Every weight file the export will read
is checked first, from its safetensors header alone (https://github.com/huggingface/safetensors#format: 8-byte
little-endian header length, a JSON header of tensor dtypes, shapes and byte ranges, then the tensor bytes), and
the header's tensor sizes give the size of the package, checked against the free space of the output's disk.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable

from diffrt.errors import ExportError

logger = logging.getLogger(__name__)

# The safetensors library refuses headers above 100 MB
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
BYTES_PER_PARAMETER = {"fp32": 4, "fp16": 2, "bf16": 2}


def check_weight_files(files: Iterable[Path]) -> int:
    """Validate each safetensors file's header against its size; returns the number of floating-point parameters.
    ExportError naming the first damaged file."""
    total = 0
    for path in files:
        total += _float_parameters(path, read_safetensors_header(path))
    return total


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file (`__metadata__` left out), checked to describe exactly its bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise _corrupt(path, f"its header length field ({length if length >= 0 else 'missing'}) does not "
                               f"fit the file's {size} bytes (truncated, or not a safetensors file)")
            raw = stream.read(length)
    except OSError as error:
        raise ExportError(f"cannot read the weight file {path}: {error}") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, f"its header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = max((_checked_range(path, name, entry) for name, entry in tensors.items()), default=0)
    data = size - 8 - length
    if end != data:
        what = "truncated" if end > data else "longer than its header describes"
        raise _corrupt(path, f"{what}: the header describes {end} bytes of tensor data, the file holds {data}")
    return tensors


def _checked_range(path: Path, name: str, entry: Any) -> int:
    """The end offset of one tensor entry, after checking its fields and that its byte range fits dtype x shape."""
    if not isinstance(entry, dict):
        raise _corrupt(path, f"tensor {name!r} has no dtype / shape / data_offsets entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape or data_offsets: {entry!r}")
    if dtype in DTYPE_BYTES:  # newer sub-byte dtypes are not sized here; their range is still checked above
        expected = DTYPE_BYTES[dtype]
        for dim in shape:
            expected *= dim
        if offsets[1] - offsets[0] != expected:
            raise _corrupt(path, f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes, its range holds "
                           f"{offsets[1] - offsets[0]}")
    return int(offsets[1])


def _float_parameters(path: Path, tensors: dict[str, Any]) -> int:
    count = 0
    for entry in tensors.values():
        if entry.get("dtype") in FLOAT_DTYPES:
            elements = 1
            for dim in entry["shape"]:
                elements *= dim
            count += elements
    return count


def _corrupt(path: Path, why: str) -> ExportError:
    return ExportError(f"the weight file {path} is damaged: {why}; nothing was exported (download or copy it again)")


def check_free_space(output: Path, parameters: int, precision: str) -> None:
    """ExportError when the file system of `output` has less free space than the package's weights need (an
    existing package being replaced stays until the new one is complete, so its space does not count)."""
    needed = parameters * BYTES_PER_PARAMETER.get(precision, 4)
    place = output.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    logger.debug("the package needs about %d bytes; %d free at %s", needed, free, place)
    if free < needed:
        raise ExportError(f"not enough disk space for {output}: its {precision} weights need about "
                          f"{needed / 1e9:.2f} GB, {place} has {free / 1e9:.2f} GB free")
