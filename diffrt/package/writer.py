"""Writes a model package (docs/package-format.md) atomically, and its manifest `diffrt.json`.

Everything is written into `.NAME.tmp-XXXX` beside the output and renamed into place only when complete
(`diffrt.package.files.AtomicFolder`), so an interrupted or failed export never leaves a half-written package where
a runtime would find it. Replacing an existing package renames the old one aside first, then the new one in, then
deletes the old one; which folders may be replaced at all is `diffrt.package.output`'s rule.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from diffrt.errors import ExportError
from diffrt.package.files import AtomicFolder, files_sha256
from diffrt.package.names import DEEP_CACHE_KEY, FORMAT_NAME, FORMAT_VERSION, ONNX_ENTRY
from diffrt.package.output import check_output, output_path
from diffrt.package.weights import PARAMETERS_KEY

logger = logging.getLogger(__name__)


class PackageWriter(AtomicFolder):
    """`with PackageWriter(output, overwrite, sources) as folder:` write into `folder`; renamed to `output` on
    success. The output rules of `diffrt.package.output` are checked on entry and again right before the rename;
    a file system error while writing (disk full, read-only, ...) becomes an ExportError naming the output, with
    the temp folder removed."""

    def __init__(self, output: Path, overwrite: bool = False, sources: Iterable[tuple[str, Path]] = ()):
        self.sources = list(sources)
        super().__init__(output_path(output), check=lambda: check_output(self.target, overwrite, self.sources))
        self.output = self.target
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        check_output(self.output, self.overwrite, self.sources)
        try:
            return super().__enter__()
        except OSError as error:
            raise _write_error(self.output, error) from error

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        try:
            super().__exit__(kind, error, traceback)
        except OSError as failure:  # the final rename
            raise _write_error(self.output, failure) from failure
        if isinstance(error, OSError):
            raise _write_error(self.output, error) from error


def _write_error(output: Path, error: OSError) -> ExportError:
    where = f" ({error.filename})" if error.filename and str(error.filename) not in str(error) else ""
    return ExportError(f"exporting to {output} failed (nothing was left behind): {error}{where}")


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
                   exporter: Mapping[str, str], components: Mapping[str, Any],
                   deep_cache_branch: int | None = None) -> dict[str, Any]:
    """`diffrt.json`, in the documented key order; `deep_cache_branch`: the package has DeepCache's UNet output and
    `unet_shallow` component for that skip branch."""
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
        **({DEEP_CACHE_KEY: {"branch": int(deep_cache_branch)}} if deep_cache_branch is not None else {}),
        "components": dict(components),
    }


def component_entry(*, file: str, external_data: str | None, precision: str, inputs: list[dict],
                    outputs: list[dict], dims: Mapping[str, tuple[int, int]],
                    validation: Mapping[str, float] | None, opset: int | None = None,
                    parameters: Mapping[str, list[list[str]]] | None = None) -> dict[str, Any]:
    """One component's manifest entry; `parameters`: {Diffusers parameter: [[initializer, layout], ...]}
    (`diffrt.package.weights`), for the components adapters apply to."""
    return {
        "file": file,
        "external_data": external_data,
        "precision": precision,
        **({"opset": int(opset)} if opset is not None else {}),
        "inputs": inputs,
        "outputs": outputs,
        "dims": {name: [int(low), int(high)] for name, (low, high) in dims.items()},
        "validation": dict(validation) if validation is not None else None,
        **({PARAMETERS_KEY: dict(parameters)} if parameters is not None else {}),
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
        if "parameters" in entry:  # the documented key order: the (long) parameter map last
            entry["parameters"] = entry.pop("parameters")


def _file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": files_sha256([path])}
