"""Read a `.safetensors` file into NumPy arrays without torch or the `safetensors` package.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes. Never
pickle: adapters are downloaded files, and a pickle runs code when loaded.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from diffrt.errors import InputError

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of the file; floating tensors as float32 (bfloat16 widened), others as stored."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"{path} is not a .safetensors file: diffrt reads adapters only as safetensors (a pickled "
                         ".ckpt / .pt / .bin file can run code when loaded; convert it with a trusted tool first)")
    if not path.is_file():
        raise InputError(f"adapter file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= length <= min(_MAX_HEADER, size - 8):
            raise InputError(f"{path} is not a safetensors file (damaged or truncated header)")
        try:
            header = json.loads(stream.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path} is not a safetensors file (its header is not JSON: {error})") from None
    metadata = header.pop("__metadata__", None) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length) if size > 8 + length else np.zeros(0, "u1")
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor(path, name, entry, data)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor(path: Path, name: str, entry: dict, data: np.ndarray) -> np.ndarray:
    dtype = _DTYPES.get(str(entry.get("dtype")))
    begin, end = entry.get("data_offsets", (0, -1))
    shape = tuple(int(n) for n in entry.get("shape", ()))
    if dtype is None:
        raise InputError(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which diffrt cannot read")
    if not 0 <= begin <= end <= data.size or (end - begin) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise InputError(f"{path}: tensor {name!r} lies outside the file or does not match its shape (truncated?)")
    array = data[begin:end].view(dtype).reshape(shape)
    if entry["dtype"] == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    return np.asarray(array)
