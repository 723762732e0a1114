"""Writes a model package (docs/package-format.md) atomically, and its manifest `diffrt.json`.

Everything is written into `.NAME.tmp-XXXX` beside the output and renamed into place only when complete, so an
interrupted or failed export never leaves a half-written package where a runtime would find it. Replacing an
existing package renames the old one aside first, then the new one in, then deletes the old one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping

from diffrt.errors import invalid

logger = logging.getLogger(__name__)

FORMAT_NAME = "diffrt-package"
FORMAT_VERSION = 1
MANIFEST_NAME = "diffrt.json"
INDEX_NAME = "model_index.json"
ONNX_ENTRY = ["diffusers", "OnnxRuntimeModel"]  # model_index entry of an ONNX component (Optimum / diffusers)


def default_mode(directory: bool = False) -> int:
    """Permissions a plain mkdir / open would give under the current umask (mkdtemp / mkstemp use 0700 / 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`; refuse a file where the package folder would go."""
    if output.exists() and not overwrite:
        raise invalid("output", "a path that does not exist yet (pass overwrite=True, or --overwrite, to replace it)",
                      str(output))
    if output.exists() and not output.is_dir():
        raise invalid("output", "a folder path (an existing file is never replaced)", str(output))


class PackageWriter:
    """`with PackageWriter(output, overwrite) as folder:` write into `folder`; renamed to `output` on success."""

    def __init__(self, output: Path, overwrite: bool = False):
        self.output = Path(output)
        self.overwrite = overwrite
        self.folder: Path | None = None

    def __enter__(self) -> Path:
        check_output(self.output, self.overwrite)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        os.chmod(self.folder, default_mode(directory=True))  # the package is shared like any folder
        return self.folder

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        assert self.folder is not None
        if kind is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def _commit(self) -> None:
        assert self.folder is not None
        if not self.output.exists():
            os.replace(self.folder, self.output)
            return
        check_output(self.output, self.overwrite)  # it may have appeared while we were exporting
        aside = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.old-", dir=self.output.parent))
        os.replace(self.output, aside / "package")
        try:
            os.replace(self.folder, self.output)
        except BaseException:
            os.replace(aside / "package", self.output)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=False)
            stream.write("\n")
        os.chmod(temp, default_mode())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def copy_file(source: Path, target: Path) -> None:
    """Copy one file atomically (temp file in the target folder, then os.replace)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, temp)
    os.replace(temp, target)


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


def summary_table(rows: list[tuple[str, int, float, float | None]]) -> str:
    """(component, file bytes, export seconds, max abs diff) rows as an aligned text table."""
    lines = [f"{'component':<16}{'size':>12}{'export s':>10}{'max abs diff':>14}"]
    for name, size, seconds, diff in rows:
        shown = "-" if diff is None else f"{diff:.3g}"
        lines.append(f"{name:<16}{_size(size):>12}{seconds:>10.1f}{shown:>14}")
    return "\n".join(lines)


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
