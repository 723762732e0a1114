"""The model package format (docs/package-format.md): its names, reading, writing and TensorRT build records.

The one place that knows the on-disk format; `export/` writes packages and `runtime/` reads them through it, and
it imports nothing from either (nor from `bench/` or the command line).
"""
from __future__ import annotations

from diffrt._lazy import lazy_names

_LAZY: dict[str, str] = {
    "ModelPackage": "diffrt.package.reader",
    "ComponentInfo": "diffrt.package.reader",
    "PackageWriter": "diffrt.package.writer",
    "TensorSpec": "diffrt.package.specs",
    "read_json": "diffrt.package.files",
    "write_json": "diffrt.package.files",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
