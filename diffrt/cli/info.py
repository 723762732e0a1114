"""`diffrt info PACKAGE`: a package's manifest and its TensorRT engines, as text."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffrt.errors import InputError
from diffrt.package.files import read_json
from diffrt.package.names import ENGINES_FOLDER, MANIFEST_NAME
from diffrt.package.reader import ModelPackage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, help="model package folder")


def run(args: argparse.Namespace) -> int:
    sys.stdout.write(describe_package(args.package) + "\n")
    return 0


def read_manifest(package: Path) -> dict[str, Any]:
    """The manifest of a package folder, read and checked by `ModelPackage`; InputError naming the path when the
    folder is no diffrt package."""
    if not (Path(package) / MANIFEST_NAME).is_file():
        raise InputError(f"`package` must be a model package folder with {MANIFEST_NAME}; got {str(package)!r}")
    return dict(ModelPackage.open(package).manifest or {})


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _component_lines(name: str, entry: Mapping[str, Any]) -> list[str]:
    check = entry.get("validation") or {}
    diff = f"max abs diff {check['max_abs_diff']:.3g} (bound {check['tolerance']:.3g})" if check else "not validated"
    external = f" + {entry['external_data']}" if entry.get("external_data") else ""
    lines = [f"  {name}: {entry.get('file')}{external}, {entry.get('precision')}, {diff}"]
    for arrow, key in (("in ", "inputs"), ("out", "outputs")):
        lines += [f"      {arrow} {io['name']}: {io['dtype']} {_shape(io['shape'])}" for io in entry.get(key, [])]
    dims = ", ".join(f"{dim} {low}..{high}" for dim, (low, high) in entry.get("dims", {}).items())
    lines.append(f"      dims: {dims}")
    return lines


def describe_manifest(manifest: Mapping[str, Any]) -> str:
    """A manifest as aligned, human-readable text."""
    source = manifest.get("source", {})
    revision = f", revision {source['revision']}" if source.get("revision") else ""
    exporter = ", ".join(f"{k} {v}" for k, v in manifest.get("exporter", {}).items())
    lines = [
        f"pipeline   {manifest.get('pipeline')}",
        f"source     {source.get('id')} ({source.get('kind')}{revision})",
        f"precision  {manifest.get('precision')}",
        f"target     {manifest.get('target')} (opset {manifest.get('opset')})",
        f"exporter   {exporter}",
        f"created    {manifest.get('created')} ({manifest.get('format')} v{manifest.get('format_version')})",
        "components",
    ]
    for name, entry in manifest.get("components", {}).items():
        lines += _component_lines(name, entry)
    return "\n".join(lines)


def describe_engines(package: Path) -> str:
    """One line per TensorRT engine build record (`<component>/engines/<key>.json`) in the package."""
    lines = []
    for record in sorted(Path(package).glob(f"*/{ENGINES_FOLDER}/*.json")):
        try:
            data = read_json(record)
        except (OSError, ValueError):  # an unreadable record is listed without details
            data = {}
        details = ", ".join(f"{k} {data[k]}" for k in ("gpu", "sm", "tensorrt", "precision") if k in data)
        missing = "" if record.with_suffix(".plan").is_file() else " (plan file missing)"
        suffix = f": {details}" if details else ""
        lines.append(f"  {record.parent.parent.name}/{ENGINES_FOLDER}/{record.stem}{missing}{suffix}")
    return "engines\n" + "\n".join(lines) if lines else "engines    none"


def describe_package(package: Path) -> str:
    """What `diffrt info PACKAGE` prints: the manifest and any TensorRT engines."""
    return describe_manifest(read_manifest(package)) + "\n" + describe_engines(package)
