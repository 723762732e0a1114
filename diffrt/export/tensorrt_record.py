"""Build records and files of TensorRT engines: the record, its key, and atomic writes of plan + record.

The key is a short hash of everything that determines the plan (ONNX bytes, precision, profiles, flags,
optimization level, GPU, TensorRT, diffrt), so an engine is rebuilt exactly when one of them changes and engines
for several GPUs can sit side by side in one package. The `build` block (time, size, date) is informational and
not part of the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffrt.export.package import default_mode
from diffrt.runtime.engines.tensorrt_records import (
    BUILD_INFO, RECORD_FORMAT, RECORD_VERSION, EngineRecord, Platform, Profile, profiles_to_record,
)
from diffrt.runtime.package import ComponentInfo

KEY_LENGTH = 16
CHUNK = 1 << 20


def files_sha256(paths: Sequence[Path]) -> str:
    """sha256 over the files' bytes in order (the ONNX graph, then its external weights)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def onnx_files(component: ComponentInfo) -> list[Path]:
    """The component's model file and its external-data file, if any (the weights change the plan too)."""
    files = [component.path]
    external = (component.manifest or {}).get("external_data")
    candidate = component.folder / external if external else component.path.with_name(component.path.name + "_data")
    files += [candidate] if candidate.is_file() else []
    return files


def engine_record(*, component: str, onnx_sha256: str, precision: str, strongly_typed: bool,
                  profiles: Sequence[Profile], opt_level: int, flags: Mapping[str, bool], platform: Platform,
                  diffrt_version: str) -> dict[str, Any]:
    """The identifying part of a build record (what the key hashes)."""
    return {
        "format": RECORD_FORMAT,
        "format_version": RECORD_VERSION,
        "component": component,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "profiles": profiles_to_record(profiles),
        "flags": {name: bool(value) for name, value in sorted(flags.items())},
        "opt_level": int(opt_level),
        "gpu": platform.gpu,
        "sm": platform.sm,
        "tensorrt": platform.tensorrt,
        "diffrt": diffrt_version,
    }


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_key(record: Mapping[str, Any]) -> str:
    """Short sha256 of the record's canonical JSON, without the key itself and the informational build block."""
    identity = {name: value for name, value in record.items() if name not in ("key", BUILD_INFO)}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:KEY_LENGTH]


def build_info(seconds: float, plan_bytes: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"seconds": round(float(seconds), 2), "plan_bytes": int(plan_bytes),
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **dict(extra or {})}


def existing(folder: Path, key: str) -> EngineRecord | None:
    """The stored record `key` when both its JSON and its plan exist and the JSON is readable."""
    path = folder / f"{key}.json"
    if not (path.is_file() and path.with_suffix(".plan").is_file()):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return EngineRecord(path, data) if isinstance(data, dict) else None


def _temp_write(folder: Path, name: str, data: Any) -> Path:
    """Write `data` (bytes-like) to a new temp file in `folder`; removed again if writing fails."""
    handle, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(memoryview(data))
        os.chmod(temp, default_mode())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def write_bytes_atomic(path: Path, data: Any) -> None:
    """`data` to `path` through a temp file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_write(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_engine(folder: Path, key: str, plan: Any, record: Mapping[str, Any]) -> Path:
    """Write `<key>.plan` and `<key>.json` atomically; returns the record path.

    Both go to temp files first; the plan is renamed into place before the record, and the runtime only uses a
    plan whose record exists, so a crash in between leaves no half engine that could be picked.
    """
    text = json.dumps(dict(record), indent=2, allow_nan=False) + "\n"  # fails before any file is touched
    folder.mkdir(parents=True, exist_ok=True)
    plan_path, record_path = folder / f"{key}.plan", folder / f"{key}.json"
    temps: list[Path] = []
    try:
        temps.append(_temp_write(folder, plan_path.name, plan))
        temps.append(_temp_write(folder, record_path.name, text.encode()))
        os.replace(temps[0], plan_path)
        os.replace(temps[1], record_path)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return record_path
