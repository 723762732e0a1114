"""Writes a model package (docs/package-format.md) atomically, and its manifest `diffrt.json`.

Everything is written into `.NAME.tmp-XXXX` beside the output and renamed into place only when complete
(`diffrt.package.files.AtomicFolder`), so an interrupted or failed export never leaves a half-written package where
a runtime would find it. Replacing an existing package renames the old one aside first, then the new one in, then
deletes the old one.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from diffrt.errors import invalid
from diffrt.package.files import AtomicFolder, files_sha256
from diffrt.package.names import FORMAT_NAME, FORMAT_VERSION, ONNX_ENTRY

logger = logging.getLogger(__name__)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`; refuse a file where the package folder would go."""
    if output.exists() and not overwrite:
        raise invalid("output", "a path that does not exist yet (pass overwrite=True, or --overwrite, to replace it)",
                      str(output))
    if output.exists() and not output.is_dir():
        raise invalid("output", "a folder path (an existing file is never replaced)", str(output))


class PackageWriter(AtomicFolder):
    """`with PackageWriter(output, overwrite) as folder:` write into `folder`; renamed to `output` on success."""

    def __init__(self, output: Path, overwrite: bool = False):
        super().__init__(Path(output), check=lambda: check_output(self.target, overwrite))
        self.output = self.target
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_output(self.output, self.overwrite)
        return super().__enter__()


def model_index(source_index: Mapping[str, Any], onnx_components: Iterable[str], others: Iterable[str]) -> dict:
    """The source's model_index.json listing exactly the exported components (vae -> vae_encoder / vae_decoder).

    Pipeline settings (`requires_aesthetics_score`, `force_zeros_for_empty_prompt`, ...) are kept: the runtime
    reads them as diffusers does.
    """
    index = {key: value for key, value in source_index.items() if not isinstance(value, list)}
    for name in others:
        index[name] = list(source_index[name])
    for name in onnx_components:
        index[name] = list(ONNX_ENTRY)
    return index


def build_manifest(*, pipeline: str, source: Mapping[str, Any], precision: str, target: str, opset: int,
                   exporter: Mapping[str, str], components: Mapping[str, Any]) -> dict[str, Any]:
    """`diffrt.json`, in the documented key order."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "pipeline": pipeline,
        "source": dict(source),
        "precision": precision,
        "target": target,
        "opset": opset,
        "exporter": dict(exporter),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "components": dict(components),
    }


def component_entry(*, file: str, external_data: str | None, precision: str, inputs: list[dict],
                    outputs: list[dict], dims: Mapping[str, tuple[int, int]],
                    validation: Mapping[str, float] | None, opset: int | None = None) -> dict[str, Any]:
    return {
        "file": file,
        "external_data": external_data,
        "precision": precision,
        **({"opset": int(opset)} if opset is not None else {}),
        "inputs": inputs,
        "outputs": outputs,
        "dims": {name: [int(low), int(high)] for name, (low, high) in dims.items()},
        "validation": dict(validation) if validation is not None else None,
    }


def record_component_files(folder: Path, components: Mapping[str, dict[str, Any]],
                           names: Iterable[str] | None = None) -> None:
    """Add `files` (package-relative path -> size and sha256) to each manifest entry in `components` (only `names`,
    when given), from the files now in `folder`: the ONNX model and its external data.

    The runtime checks the sizes whenever it opens the package (cheap: a truncated download or a half-copied file
    is found before any engine is built) and the hashes when asked (`verify=True`, `diffrt info --verify`).
    config.json is not recorded: its values are checked by type, range and against the graph instead, so a
    deliberate edit that still fits the model is not reported as damage.
    """
    for name in components if names is None else names:
        entry = components[name]
        model = PurePosixPath(entry["file"])
        paths = [model]
        if entry.get("external_data"):
            paths.append(model.parent / entry["external_data"])
        entry["files"] = {str(path): _file_record(folder / path) for path in paths if (folder / path).is_file()}


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": files_sha256([path])}
