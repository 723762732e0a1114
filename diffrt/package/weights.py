"""Where a component's Diffusers parameters live in its ONNX file: the manifest's `parameters` map, and the
initializers' bytes read straight from `model.onnx` / its external data (memory-mapped, no `onnx`, no torch).

Written by the exporter (`diffrt.export.parameter_map`), read by the runtime's adapters (LoRA, textual inversion),
which override those initializers when they create an engine. docs/package-format.md describes the format.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from diffrt.errors import PackageError
from diffrt.package.onnx_io import _BYTES, _VARINT, ELEM_TYPES, _fields, _read, graph_fields

PARAMETERS_KEY = "parameters"
#: the initializer holds the parameter's elements in the parameter's own order (its shape may differ: reshaped)
LAYOUT_DIRECT = "direct"
#: the initializer holds the transpose of the parameter as an [out, in] matrix (MatMul weights)
LAYOUT_TRANSPOSED = "transposed"
LAYOUTS = (LAYOUT_DIRECT, LAYOUT_TRANSPOSED)
# transformers 5's CLIPTextModel drops the `text_model.` level its checkpoints, LoRA files and
# CLIPTextModelWithProjection still use: names are recorded with it, so every tool's names match.
_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_FLOAT_TYPES = ("float32", "float16", "float64", "bfloat16")


def canonical_parameter(component: str, name: str) -> str:
    """The parameter name as checkpoints and LoRA files spell it (text encoders: under `text_model.`)."""
    if component.startswith("text_encoder") and name.startswith(_TEXT_MODEL_PARTS):
        return "text_model." + name
    return name


@dataclass(frozen=True)
class Placement:
    """One initializer holding (a copy of) a parameter, and in which layout."""

    initializer: str
    layout: str


def parameter_placements(component: str, manifest: dict | None, package_root: Path | str = "") -> dict[
        str, list[Placement]]:
    """The `parameters` map of a component's manifest entry; PackageError saying to re-export when it has none."""
    entry = (manifest or {}).get(PARAMETERS_KEY)
    if not isinstance(entry, dict):
        raise PackageError(
            f"the {component} of the package {package_root} records no parameter map (`{PARAMETERS_KEY}` in its "
            "diffrt.json entry), which LoRA and textual inversion need: it was exported by an older diffrt or is "
            "not a diffrt package; re-export it with this version (`diffrt export SOURCE OUTPUT --overwrite`), or add "
            "the map from the checkpoint it was exported from: `diffrt.export.add_parameter_maps(SOURCE, PACKAGE)`")
    placements: dict[str, list[Placement]] = {}
    for name, places in entry.items():
        if not isinstance(places, list) or not all(
                isinstance(p, list) and len(p) == 2 and p[1] in LAYOUTS for p in places):
            raise PackageError(f"{component}: malformed `{PARAMETERS_KEY}` entry for {name!r} in diffrt.json")
        placements[name] = [Placement(str(p[0]), str(p[1])) for p in places]
    return placements


def to_initializer(value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """A parameter-shaped array as the initializer of `shape` stores it."""
    if layout == LAYOUT_TRANSPOSED:
        value = value.reshape(value.shape[0], -1).T
    return np.ascontiguousarray(value).reshape(shape)


def from_initializer(value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """An initializer's array in the parameter's own `shape`."""
    if layout == LAYOUT_TRANSPOSED:
        return np.ascontiguousarray(value.reshape(-1, shape[0]).T).reshape(shape)
    return value.reshape(shape)


def read_initializers(model: Path | str, names: Iterable[str] | None) -> dict[str, np.ndarray]:
    """The initializers `names` of the ONNX file `model`, read-only arrays memory-mapped from the file that holds
    their bytes (model.onnx itself, or the external data file beside it). PackageError naming a missing one.
    `names=None`: every floating-point initializer."""
    model = Path(model)
    return {name: np.memmap(place.file, dtype=place.dtype, mode="r", offset=place.offset,
                            shape=(int(np.prod(place.shape)) if place.shape else 1,)).reshape(place.shape)
            for name, place in locate_initializers(model, names).items()}


@dataclass(frozen=True)
class Stored:
    """Where an initializer's bytes are: `file` (model.onnx, or its external data file when `external`)."""

    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    external: bool


def locate_initializers(model: Path | str, names: Iterable[str] | None, *,
                        skip_typed: bool = False) -> dict[str, Stored]:
    """Where the initializers `names` (None: all floating-point ones) of the ONNX file `model` keep their bytes;
    PackageError naming a missing one. Only the graph's initializer headers are read: tensor data is skipped.
    `skip_typed`: leave out initializers that keep their values in typed fields instead of refusing them (ONNX
    Runtime's optimised models write small constants that way)."""
    model = Path(model)
    wanted = set(names) if names is not None else None
    found: dict[str, Stored] = {}
    try:
        with open(model, "rb") as stream:
            for field, wire, offset, length in graph_fields(stream, model):
                if field == 5 and wire == _BYTES and (wanted is None or len(found) < len(wanted)):
                    tensor = _tensor(stream, model, offset, offset + length, wanted, skip_typed)
                    if tensor is not None:
                        found[tensor[0]] = tensor[1]
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        raise PackageError(f"{model} is not a readable ONNX model (damaged or truncated?): {error}") from None
    missing = sorted(wanted - set(found)) if wanted is not None else []
    if missing:
        raise PackageError(f"{model} has no initializer {missing[0]!r} (of {len(missing)} missing) that its "
                           "manifest's parameter map names: the package was modified after export; re-export it")
    return found


def _tensor(stream: BinaryIO, model: Path, start: int, end: int, wanted: set[str] | None,
            skip_typed: bool = False) -> tuple[str, Stored] | None:
    dims: list[int] = []
    dtype, name, raw = 0, None, None
    external: dict[str, str] = {}
    for field, wire, offset, length in _fields(stream, start, end):
        if field == 1 and wire == _VARINT:
            dims.append(length)
        elif field == 1 and wire == _BYTES:  # packed dims
            dims.extend(_packed_varints(_read(stream, offset, offset + length)))
        elif field == 2 and wire == _VARINT:
            dtype = length
        elif field == 8 and wire == _BYTES:
            name = _read(stream, offset, offset + length).decode()
            if wanted is not None and name not in wanted:
                return None
        elif field == 9 and wire == _BYTES:
            raw = (offset, length)
        elif field == 13 and wire == _BYTES:
            entry = {f: _read(stream, o, o + n).decode() for f, w, o, n in _fields(stream, offset, offset + length)
                     if w == _BYTES}
            external[entry.get(1, "")] = entry.get(2, "")
    if name is None or (wanted is None and ELEM_TYPES.get(dtype) not in _FLOAT_TYPES):
        return None
    numpy_dtype = _numpy_dtype(dtype, name, model)
    if raw is not None:
        return name, Stored(model, raw[0], numpy_dtype, tuple(dims), external=False)
    if "location" in external:
        source = model.parent / external["location"]
        return name, Stored(source, int(external.get("offset", 0)), numpy_dtype, tuple(dims), external=True)
    if skip_typed:
        return None
    raise PackageError(f"{model}: initializer {name!r} keeps its values in typed fields, not raw bytes; "
                       "re-export the package")


def _numpy_dtype(elem_type: int, name: str, model: Path) -> np.dtype:
    dtype = ELEM_TYPES.get(elem_type)
    if dtype in ("float32", "float16", "float64"):
        return np.dtype(dtype).newbyteorder("<")
    if dtype == "bfloat16":  # no NumPy type: its bits, widened by the caller
        return np.dtype("<u2")
    raise PackageError(f"{model}: initializer {name!r} has type {dtype}, not a floating-point weight")


def _packed_varints(data: bytes) -> list[int]:
    values, value, shift = [], 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value, shift = 0, 0
    return values
