"""`diffrt info PACKAGE`: a package's manifest and its TensorRT engines, as text.

PACKAGE is a folder, a built-in name (`diffrt info digits`) or a Hub repo id (`--revision` picks a branch, tag or
commit), of which only the JSON files are fetched when it has a manifest (the manifest says everything printed
here; the weights can be gigabytes). A package without `diffrt.json` (Optimum's `optimum-cli export onnx` output)
is described from its model_index.json and the inputs and outputs of its ONNX graphs. `--verify` hashes every
component file against the sha256 the manifest records. Whatever the manifest holds, the result is text or a
one-line error: fields of unexpected types are shown as they are, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from diffrt.errors import InputError, PackageError
from diffrt.package.files import read_json
from diffrt.package.names import ENGINES_FOLDER, INDEX_NAME, MANIFEST_NAME
from diffrt.package.reader import ModelPackage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", help="model package folder, built-in name (digits) or Hub repo id")
    parser.add_argument("--revision", default=None, help="with a Hub repo id: the branch, tag or commit")
    parser.add_argument("--verify", action="store_true",
                        help="hash every component file against the sha256 recorded in the manifest")


def run(args: argparse.Namespace) -> int:
    folder, local = locate_package(args.package, revision=args.revision, files=args.verify)
    sys.stdout.write(describe_package(folder, check_files=local) + "\n")
    if args.verify:
        sys.stdout.write(verify_package(folder) + "\n")
    return 0


def locate_package(name: str, revision: str | None = None, files: bool = False) -> tuple[Path, bool]:
    """(the folder holding the package, whether its model files are there): a folder or built-in name as is; a Hub
    repo id as a snapshot of its JSON files (from the cache when offline), or of the whole package when `files`
    are needed or it has no manifest to describe it (Optimum's packages are described from their ONNX graphs)."""
    from diffrt.runtime.builtin import builtin_names, resolve_builtin

    folder = Path(resolve_builtin(name))
    if folder.is_dir():  # a local folder has no revisions: `--revision` is ignored, as by from_pretrained
        return folder, True
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or os.path.exists(name):
        raise InputError(f"`package` must be a model package folder, a built-in name ({', '.join(builtin_names())}) "
                         f"or a Hub repo id (owner/name); got {name!r}")
    from huggingface_hub.utils import HFValidationError

    from diffrt.runtime.hub import hub_cache_dir, hub_offline, hub_snapshot, resolve_package

    try:
        if not files:
            folder = hub_snapshot(name, revision=revision, allow_patterns=["*.json"], cache_dir=hub_cache_dir(),
                                  local_files_only=hub_offline(), purpose="the package manifest")
            if (folder / MANIFEST_NAME).is_file():
                return folder, False
        return resolve_package(name, revision=revision), True
    except HFValidationError as error:
        raise InputError(f"`package` {name!r} is no folder and no valid Hub repo id: {error}") from None


def read_manifest(package: Path, check_files: bool = True) -> dict[str, Any]:
    """The manifest of a package folder, read and checked by `ModelPackage` (`check_files=False`: the JSON only,
    for a Hub snapshot without the model files); InputError naming the path when the folder is no diffrt package."""
    if not (Path(package) / MANIFEST_NAME).is_file():
        raise InputError(f"`package` must be a model package folder with {MANIFEST_NAME}; got {str(package)!r}")
    if not check_files:
        return read_json(Path(package) / MANIFEST_NAME, required=True, error=PackageError)
    return dict(ModelPackage.open(package).manifest or {})


def _mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a JSON object, else an empty one: info prints what is there, and skips what is malformed."""
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if isinstance(shape, list) else str(shape)


def _component_lines(name: str, entry: Mapping[str, Any]) -> list[str]:
    check = _mapping(entry.get("validation"))
    diff = (f"max abs diff {_number(check.get('max_abs_diff'))} (bound {_number(check.get('tolerance'))})"
            if check else "not validated")
    external = f" + {entry['external_data']}" if entry.get("external_data") else ""
    lines = [f"  {name}: {entry.get('file')}{external}, {entry.get('precision')}, {diff}"]
    for arrow, key in (("in ", "inputs"), ("out", "outputs")):
        specs: list[Any] = entry[key] if isinstance(entry.get(key), list) else []
        lines += [f"      {arrow} {io.get('name')}: {io.get('dtype')} {_shape(io.get('shape'))}"
                  for io in map(_mapping, specs)]
    dims = ", ".join(f"{dim} {_range(value)}" for dim, value in _mapping(entry.get("dims")).items())
    lines.append(f"      dims: {dims}")
    return lines


def _range(value: Any) -> str:
    return f"{value[0]}..{value[1]}" if isinstance(value, (list, tuple)) and len(value) == 2 else str(value)


def describe_manifest(manifest: Mapping[str, Any]) -> str:
    """A manifest as aligned, human-readable text."""
    source = _mapping(manifest.get("source"))
    revision = f", revision {source['revision']}" if source.get("revision") else ""
    exporter = ", ".join(f"{k} {v}" for k, v in _mapping(manifest.get("exporter")).items())
    lines = [
        f"pipeline   {manifest.get('pipeline')}",
        f"source     {source.get('id')} ({source.get('kind')}{revision})",
        f"precision  {manifest.get('precision')}",
        f"target     {manifest.get('target')} (opset {manifest.get('opset')})",
        f"exporter   {exporter}",
        f"created    {manifest.get('created')} ({manifest.get('format')} v{manifest.get('format_version')})",
        "components",
    ]
    for name, entry in _mapping(manifest.get("components")).items():
        lines += _component_lines(name, _mapping(entry))
    return "\n".join(lines)


def describe_engines(package: Path, check_files: bool = True) -> str:
    """One line per TensorRT engine build record (`<component>/engines/<key>.json`) in the package."""
    lines = []
    for record in sorted(Path(package).glob(f"*/{ENGINES_FOLDER}/*.json")):
        try:
            data = read_json(record)
        except (OSError, ValueError):  # an unreadable record is listed without details
            data = {}
        details = ", ".join(f"{k} {data[k]}" for k in ("gpu", "sm", "tensorrt", "precision") if k in data)
        missing = "" if not check_files or record.with_suffix(".plan").is_file() else " (plan file missing)"
        suffix = f": {details}" if details else ""
        lines.append(f"  {record.parent.parent.name}/{ENGINES_FOLDER}/{record.stem}{missing}{suffix}")
    return "engines\n" + "\n".join(lines) if lines else "engines    none"


def describe_package(package: Path, check_files: bool = True) -> str:
    """What `diffrt info PACKAGE` prints: the manifest and any TensorRT engines (`check_files=False`: a snapshot
    of the JSON files only, whose plan files are not there to check); a package without a manifest (Optimum's
    layout) is described from its ONNX graphs."""
    package = Path(package)
    if not (package / MANIFEST_NAME).is_file() and (package / INDEX_NAME).is_file() and check_files:
        return describe_graphs(ModelPackage.open(package)) + "\n" + describe_engines(package, check_files)
    if not (package / MANIFEST_NAME).is_file():
        raise InputError(f"`package` must be a model package folder with {MANIFEST_NAME} (diffrt's) or "
                         f"{INDEX_NAME} and ONNX components (Optimum's); got {str(package)!r}")
    manifest = read_manifest(package, check_files)
    return describe_manifest(manifest) + "\n" + describe_engines(package, check_files)


def describe_graphs(package: ModelPackage) -> str:
    """A package without diffrt.json: its pipeline class from model_index.json, each component's model file(s)
    and the inputs / outputs its ONNX graph declares."""
    lines = [f"pipeline   {package.pipeline_class}",
             f"layout     {package.index.get('_class_name')} (model_index.json; no {MANIFEST_NAME}, so no manifest "
             "facts: source, precision, validation)",
             "components"]
    for name, info in package.components.items():
        size = sum(path.stat().st_size for path in info.folder.glob("model.onnx*") if path.is_file())
        files = ", ".join(sorted(path.name for path in info.folder.glob("model.onnx*")))
        lines.append(f"  {name}: {name}/{files}, {size / 2 ** 20:.1f} MiB")
        for arrow, tensors in (("in ", info.graph[0]), ("out", info.graph[1])):
            lines += [f"      {arrow} {tensor.name}: {tensor.dtype} {_shape(list(tensor.shape or ()))}"
                      for tensor in tensors]
    return "\n".join(lines)


def verify_package(folder: Path) -> str:
    """`--verify`: hash the files (PackageError naming the first that differs); the line saying what was checked."""
    checked = ModelPackage.open(folder).verify()
    return f"verified   {checked} files: sizes and sha256 match the manifest"
