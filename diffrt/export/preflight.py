"""Checks of the source's weight files before the first component is exported.

A truncated download or a file with a garbage header would otherwise be found only when its component is loaded,
after the components before it were exported (minutes for a real model). Every weight file the export will read
is checked first, from its safetensors header alone (https://github.com/huggingface/safetensors#format: 8-byte
little-endian header length, a JSON header of tensor dtypes, shapes and byte ranges, then the tensor bytes), and
the header's tensor sizes give the size of the package, checked against the free space of the output's disk.

The same parameter counts, per checkpoint folder, give the memory the export will need: components are exported
one at a time, so the largest one sets the peak (see `estimate_memory` for where its factors come from). An export
that cannot fit is refused before anything is written, rather than killed by the OOM killer half an hour in. The
check reads MemAvailable from /proc/meminfo (skipped where there is none); `DIFFRT_SKIP_MEMORY_CHECK=1` skips it
for users who know better (swap, or memory that other processes are about to free).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

from diffrt.errors import ExportError

logger = logging.getLogger(__name__)

# The safetensors library refuses headers above 100 MB
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
BYTES_PER_PARAMETER = {"fp32": 4, "fp16": 2, "bf16": 2}
MEMINFO = Path("/proc/meminfo")
SKIP_MEMORY_CHECK = "DIFFRT_SKIP_MEMORY_CHECK"
FLOAT32_BYTES = 4
# The memory an export needs, from two measurements (scripts/export_memory.py, docs/benchmarks.md: random weights
# with SD 3.5 medium's published transformer config, 2-core AMD EPYC, 24 GiB, torch 2.13, onnxruntime 1.32).
# A component is exported in phases, one after the other; the peak is the largest of:
# - its load: the weight files' tensors and the float32 model made from them are both alive, whatever the export's
#   precision: RSS = file bytes + 4 bytes x values + MEMORY_BASE. Measured: the full transformer (2,469,663,936
#   values, a 4.94 GB bf16 file; bf16 export without validation) peaked at 14,438 MiB = 15.14 GB = 4.94 + 9.88 +
#   0.32 GB; six of its 24 blocks (824,324,416 values, 1.65 GB) peaked at 5,019 MiB in this phase = 1.65 + 3.30 +
#   0.32 GB. The bf16 conversion and torch.onnx.export after it stayed at or below the float32 model (5.4 GiB for
#   the full transformer in bf16).
# - its validation (the default): ONNX Runtime runs the package in float32 (bf16 packages are widened to float32
#   first), holding its initializers and prepacked copies of the MatMul weights: RSS = VALIDATION_FACTOR x 4 bytes
#   x values. Measured: the six-block transformer exported in fp32 with validation peaked at 6,859 MiB = 7.19 GB =
#   2.18 x its 3.30 GB of float32 weights (2.09 x after MEMORY_BASE), while ONNX Runtime validated it. fp16 packages
#   are counted the same (an upper bound).
# Re-measure when the loading or the validation changes (python scripts/export_memory.py [--num-layers N]).
MEMORY_BASE = 400_000_000  # the interpreter, torch, onnx and allocator slack: 0.32 GB measured in both runs
VALIDATION_FACTOR = 2.1  # 2.09 measured


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
    logger.info("the package's %s weights need about %.2f GB of disk; %.2f GB free at %s", precision, needed / 1e9,
                free / 1e9, place)
    if free < needed:
        raise ExportError(f"not enough disk space for {output}: its {precision} weights need about "
                          f"{needed / 1e9:.2f} GB, {place} has {free / 1e9:.2f} GB free")


def folder_weights(weight_files: Mapping[str, Path], folders: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Checkpoint folder (`transformer`, `unet`, `text_encoder_3`, ...) -> (floating-point values, file bytes) of
    its weight files, for the `folders` the export reads; `weight_files` is keyed by path relative to the
    checkpoint (`transformer/diffusion_pytorch_model.safetensors`)."""
    wanted = set(folders)
    found: dict[str, tuple[int, int]] = {}
    for rel, path in sorted(weight_files.items()):
        folder = rel.split("/")[0]
        if folder in wanted:
            values, size = found.get(folder, (0, 0))
            found[folder] = (values + _float_parameters(path, read_safetensors_header(path)),
                             size + path.stat().st_size)
    return found


def estimate_memory(parameters: int, file_bytes: int, validate: bool = True) -> int:
    """Peak resident memory (bytes) of exporting one component with `parameters` floating-point values stored in
    `file_bytes` of weight files: the larger of its load (the files' tensors and the float32 model made from them,
    whatever the export's precision) and, with `validate`, ONNX Runtime's float32 session. See the measurements
    above MEMORY_BASE."""
    load = file_bytes + FLOAT32_BYTES * parameters
    validation = VALIDATION_FACTOR * FLOAT32_BYTES * parameters if validate else 0
    return int(MEMORY_BASE + max(load, validation))


def available_memory(meminfo: Path | None = None) -> int | None:
    """MemAvailable of /proc/meminfo (or `meminfo`) in bytes; None where there is no such file or line."""
    try:
        text = (meminfo or MEMINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            value, _, unit = rest.strip().partition(" ")
            return int(value) * (1024 if unit.strip().lower() == "kb" else 1)
    return None


def check_memory(weight_files: Mapping[str, Path], folders: Iterable[str], validate: bool = True,
                 meminfo: Path | None = None) -> None:
    """Log the memory the export will need (its largest component's, as components are exported one at a time)
    and raise ExportError when the machine's available memory is below it. Skipped where MemAvailable cannot be
    read and when DIFFRT_SKIP_MEMORY_CHECK=1."""
    weights = folder_weights(weight_files, folders)
    if not weights:
        return
    needs = {folder: estimate_memory(values, size, validate) for folder, (values, size) in weights.items()}
    largest = max(needs, key=lambda folder: needs[folder])
    needed = needs[largest]
    values, size = weights[largest]
    available = available_memory(meminfo)
    logger.info("the export needs about %.1f GB of memory at its peak (%s: %.2fB parameters, %.2f GB of weight "
                "files%s); %s", needed / 1e9, largest, values / 1e9, size / 1e9, ", validated" if validate else "",
                "available memory unknown" if available is None else f"{available / 1e9:.1f} GB available")
    if os.environ.get(SKIP_MEMORY_CHECK, "").strip() not in ("", "0"):
        logger.info("%s is set: the memory check is skipped", SKIP_MEMORY_CHECK)
        return
    if available is None:
        logger.debug("no MemAvailable in %s: the memory check is skipped", meminfo or MEMINFO)
        return
    if available < needed:
        raise ExportError(_memory_refusal(largest, values, size, validate, needed, available))


def _memory_refusal(folder: str, values: int, size: int, validate: bool, needed: int, available: int) -> str:
    """The refusal: the component, what it needs and why, what is available, and what to do."""
    unvalidated = estimate_memory(values, size, validate=False)
    if validate and needed > unvalidated:
        phase = "validated by ONNX Runtime in float32"
        advice = (f"export without validation (`validate=False`, --no-validate), which needs about "
                  f"{unvalidated / 1e9:.1f} GB")
    else:
        phase = "loaded into float32"
        advice = "export from the checkpoint's fp16 weights where it has them (`variant=\"fp16\"`, --variant fp16)"
    return (f"not enough memory to export {folder}: it needs about {needed / 1e9:.1f} GB at its peak "
            f"({values / 1e9:.2f}B parameters in {size / 1e9:.2f} GB of weight files, {phase}), and this machine has "
            f"{available / 1e9:.1f} GB available; nothing was exported. Free memory, use a machine with more, or "
            f"{advice} (the export's `precision` does not lower this peak); set {SKIP_MEMORY_CHECK}=1 to export "
            "anyway (with swap to cover the difference).")
