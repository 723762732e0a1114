"""Is a component on disk what its manifest entry says: file sizes (always, cheap), sha256 (when asked), and the
ONNX graph's inputs and outputs (names, dtypes, ranks, fixed sizes).

Packages written before diffrt recorded `files` have no sizes or hashes to compare: they still load, and
verification says what it could not check.
"""
from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Sequence

from diffrt.errors import PackageError
from diffrt.package.files import files_sha256
from diffrt.package.onnx_io import GraphTensor
from diffrt.package.specs import TensorSpec

logger = logging.getLogger(__name__)


def inside_package(relative: Any, where: str) -> PurePosixPath:
    """A manifest's package-relative path, refused when it could leave the package (absolute, or with `..`).

    The path as written is checked, never where it resolves to: the Hugging Face cache stores every file of a
    snapshot as a symlink into its `blobs/` folder, outside the snapshot folder, and such packages must load.
    """
    if not isinstance(relative, str) or not relative:
        raise PackageError(f"{where} must be a non-empty package-relative path; got {relative!r}")
    path = PurePosixPath(relative.replace("\\", "/"))
    if path.is_absolute() or PureWindowsPath(relative).drive or ".." in path.parts:
        raise PackageError(f"{where} must stay inside the package (a relative path without `..`); got {relative!r}")
    return path


def recorded_files(root: Path, entry: Mapping[str, Any], where: str) -> dict[Path, Mapping[str, Any]]:
    """The manifest entry's `files` as {absolute path: {"size", "sha256"}} (empty for older packages)."""
    files = entry.get("files")
    if files is None:
        return {}
    if not isinstance(files, Mapping) or not all(isinstance(v, Mapping) for v in files.values()):
        raise PackageError(f"{where}: `files` must map package-relative paths to {{size, sha256}} objects")
    return {root / inside_package(rel, f"{where}: `files` key"): record for rel, record in files.items()}


def check_sizes(files: Mapping[Path, Mapping[str, Any]], where: str) -> None:
    """Every recorded file exists with its recorded size (a truncated download, a half-copied folder)."""
    for path, record in files.items():
        if not path.is_file():
            raise PackageError(f"{where}: file {path} is missing")
        size, expected = path.stat().st_size, record.get("size")
        if isinstance(expected, int) and size != expected:
            raise PackageError(f"{where}: file {path} has {size} bytes, the manifest records {expected} (damaged or "
                               "incompletely copied; export or download the package again)")


def verify_hashes(files: Mapping[Path, Mapping[str, Any]], where: str) -> int:
    """sha256 of every recorded file against the manifest; returns how many were hashed."""
    for path, record in files.items():
        digest = files_sha256([path])
        if digest != record.get("sha256"):
            raise PackageError(f"{where}: file {path} has sha256 {digest}, the manifest records "
                               f"{record.get('sha256')} (the file was changed or damaged)")
    return len(files)


def check_graph_io(path: Path, graph: tuple[list[GraphTensor], list[GraphTensor]],
                   declared: tuple[list[TensorSpec] | None, list[TensorSpec] | None], where: str) -> None:
    """The graph's inputs and outputs are the ones the manifest declares (the runtime builds feeds from it)."""
    for kind, in_graph, in_manifest in (("input", graph[0], declared[0]), ("output", graph[1], declared[1])):
        if in_manifest is None:
            continue
        _compare(path, kind, {t.name: t for t in in_graph}, {s.name: s for s in in_manifest}, where)


def _compare(path: Path, kind: str, graph: Mapping[str, GraphTensor], manifest: Mapping[str, TensorSpec],
             where: str) -> None:
    mismatch = f"{where}: the graph {path} does not match the manifest"
    if set(graph) != set(manifest):
        raise PackageError(f"{mismatch}: graph {kind}s {_names(graph)}, manifest {kind}s {_names(manifest)}")
    for name, spec in manifest.items():
        tensor = graph[name]
        fixed_differ = tensor.shape is not None and len(tensor.shape) == len(spec.shape) and any(
            isinstance(g, int) and isinstance(m, int) and g != m for g, m in zip(tensor.shape, spec.shape))
        rank_differs = tensor.shape is not None and len(tensor.shape) != len(spec.shape)
        if tensor.dtype != str(spec.dtype) or rank_differs or fixed_differ:
            raise PackageError(f"{mismatch}: {kind} `{name}` is {tensor.dtype} {_shape(tensor.shape)} in the graph, "
                               f"{spec.dtype} {_shape(spec.shape)} in the manifest")


def _names(items: Mapping[str, Any]) -> str:
    return ", ".join(sorted(items)) or "none"


def _shape(shape: Sequence[Any] | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
