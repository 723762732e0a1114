"""TensorRT build records: what an engine was built for, its key, writing plan + record, and whether it runs here.

Each engine `<component>/engines/<key>.plan` has its record `<key>.json` beside it (docs/tensorrt.md). The key is a
short hash of everything that determines the plan (ONNX bytes, precision, profiles, flags, optimization level, GPU,
TensorRT, diffrt), so an engine is rebuilt exactly when one of them changes and engines for several GPUs can sit
side by side in one package; the `build` block (time, size, date) is informational and not part of the key. A plan
only runs on the TensorRT version and GPU model it was built for (unless built version- or hardware-compatible), and
TensorRT's own answer to a foreign plan is a null engine with a log line at best, so the runtime compares the record
with this machine before it deserializes anything, and a mismatch is an error listing each difference. Pure Python,
no CUDA.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffrt.errors import EngineError
from diffrt.package.files import temp_file
from diffrt.package.reader import ComponentInfo

logger = logging.getLogger(__name__)

RECORD_FORMAT = "diffrt-tensorrt-engine"
RECORD_VERSION = 1
KEY_LENGTH = 16
# The informational part of a record (build time, sizes): not part of the key, never compared.
BUILD_INFO = "build"
# Hardware-compatible plans (HardwareCompatibilityLevel.AMPERE_PLUS) run on compute capability 8.0 and newer.
AMPERE_PLUS = (8, 0)

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
Profile = dict[str, ShapeRange]


@dataclass(frozen=True)
class Platform:
    """What a plan must match: the GPU's name and compute capability ("8.6"), and the TensorRT version."""

    gpu: str
    sm: str
    tensorrt: str

    def describe(self) -> str:
        return f"{self.gpu}, sm {self.sm}, TensorRT {self.tensorrt}"


@dataclass(frozen=True)
class Difference:
    """One field in which a record differs from this machine."""

    field: str
    recorded: Any
    here: Any
    note: str = ""

    def describe(self) -> str:
        text = f"{self.field} {self.recorded!r} (record) vs {self.here!r} (here)"
        return f"{text}, {self.note}" if self.note else text


def version_tuple(text: Any) -> tuple[int, ...]:
    """"10.13.0.35" -> (10, 13, 0, 35); non-numeric parts end the tuple ("10.0.0b6" -> (10, 0, 0))."""
    numbers = []
    for part in str(text).split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def profiles_from_record(data: Mapping[str, Any]) -> list[Profile]:
    """The record's `profiles` ([{input: {"min": [...], "opt": [...], "max": [...]}}]) as shape tuples."""
    profiles = []
    for entry in data.get("profiles", []):
        profiles.append({name: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])) for name, r in entry.items()})
    return profiles


def profiles_to_record(profiles: Sequence[Profile]) -> list[dict[str, dict[str, list[int]]]]:
    return [{name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in p.items()}
            for p in profiles]


def covers(profile: Profile, shapes: Mapping[str, Shape]) -> bool:
    """Whether every input the profile constrains has a shape within its [min, max] (inputs it omits are fixed)."""
    for name, (low, _, high) in profile.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != len(low):
            return False
        if not all(lo <= size <= hi for lo, size, hi in zip(low, shape, high)):
            return False
    return True


def _span(profile: Profile) -> int:
    return sum(hi - lo for low, _, high in profile.values() for lo, hi in zip(low, high))


@dataclass(frozen=True)
class EngineRecord:
    """A record file and its content (`error` says why it could not be read)."""

    path: Path
    data: dict[str, Any]
    error: str | None = None

    @property
    def key(self) -> str:
        return self.path.stem

    @property
    def plan(self) -> Path:
        return self.path.with_suffix(".plan")

    @property
    def flags(self) -> dict[str, bool]:
        return {k: bool(v) for k, v in dict(self.data.get("flags") or {}).items()}

    @property
    def profiles(self) -> list[Profile]:
        return profiles_from_record(self.data)

    def created(self) -> str:
        return str(dict(self.data.get(BUILD_INFO) or {}).get("created", ""))


def read_records(folder: Path) -> list[EngineRecord]:
    """Every `*.json` in an engines folder, sorted by name; unreadable ones carry their error."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            records.append(EngineRecord(path, {}, f"unreadable ({error})"))
            continue
        if not isinstance(data, dict):
            records.append(EngineRecord(path, {}, f"not a JSON object ({type(data).__name__})"))
        else:
            records.append(EngineRecord(path, data))
    return records


def _sm_tuple(text: Any) -> tuple[int, ...]:
    return version_tuple(text)[:2]


def _gpu_differences(data: Mapping[str, Any], here: Platform, hardware_compatible: bool) -> list[Difference]:
    if hardware_compatible:
        if _sm_tuple(here.sm) < AMPERE_PLUS:
            return [Difference("sm", data.get("sm"), here.sm, "hardware-compatible engines need sm 8.0 or newer")]
        return []
    found = []
    if data.get("gpu") != here.gpu:
        found.append(Difference("gpu", data.get("gpu"), here.gpu))
    if _sm_tuple(data.get("sm")) != _sm_tuple(here.sm):
        found.append(Difference("sm", data.get("sm"), here.sm))
    return found


def _version_differences(data: Mapping[str, Any], here: Platform, version_compatible: bool) -> list[Difference]:
    built, installed = version_tuple(data.get("tensorrt")), version_tuple(here.tensorrt)
    if version_compatible:
        # A version-compatible plan runs on its own TensorRT and later ones of the same major version.
        if not built or installed[:1] != built[:1] or installed < built:
            note = "version-compatible engines need the same major version, this one or newer"
            return [Difference("tensorrt", data.get("tensorrt"), here.tensorrt, note)]
        return []
    if str(data.get("tensorrt")) != here.tensorrt:
        return [Difference("tensorrt", data.get("tensorrt"), here.tensorrt)]
    return []


def differences(record: EngineRecord, here: Platform) -> list[Difference]:
    """Why `record`'s plan cannot run here ([] when it can): format, plan file, GPU / SM, TensorRT version."""
    if record.error is not None:
        return [Difference("record", record.error, "a readable build record")]
    data = record.data
    if data.get("format") != RECORD_FORMAT or data.get("format_version") != RECORD_VERSION:
        got = f"{data.get('format')} v{data.get('format_version')}"
        return [Difference("format", got, f"{RECORD_FORMAT} v{RECORD_VERSION}")]
    found = []
    if not record.plan.is_file():
        found.append(Difference("plan", f"{record.plan.name} missing", "the plan beside its record"))
    flags = record.flags
    found += _gpu_differences(data, here, flags.get("hardware_compatible", False))
    found += _version_differences(data, here, flags.get("version_compatible", False))
    return found


def rebuild_command(package: Path) -> str:
    return f"diffrt build-engines {package} --rebuild"


def select_records(folder: Path, here: Platform, component: str, package: Path) -> list[EngineRecord]:
    """The records in `folder` whose plans can run here; EngineError when there are none (saying what to run)."""
    records = read_records(folder)
    if not records:
        raise EngineError(
            f"provider 'trt' found no TensorRT engine for `{component}` (no build records in {folder}); "
            f"build them on this machine first: `diffrt build-engines {package}`"
        )
    usable: list[tuple[EngineRecord, list[Difference]]] = []
    rejected: list[tuple[EngineRecord, list[Difference]]] = []
    for record in records:
        found = differences(record, here)
        (rejected if found else usable).append((record, found))
    for record, found in rejected:
        logger.debug("skipping TensorRT engine %s: %s", record.path, "; ".join(d.describe() for d in found))
    if not usable:
        lines = [f"  {record.path.name}: " + "; ".join(d.describe() for d in found) for record, found in rejected]
        raise EngineError(
            f"no TensorRT engine for `{component}` in {folder} fits this machine ({here.describe()}):\n"
            + "\n".join(lines) + f"\nrebuild them here with `{rebuild_command(package)}`"
        )
    return [record for record, _ in usable]


def pick_profile(records: Sequence[EngineRecord], shapes: Mapping[str, Shape]) -> tuple[EngineRecord, int] | None:
    """The (record, profile index) to run `shapes` with, or None when no profile covers them.

    Preference: a profile tuned for exactly these shapes (opt == shapes), then the narrowest range (its tactics were
    timed closest to these sizes), then the newest build.
    """
    candidates = []
    for order, record in enumerate(records):
        for index, profile in enumerate(record.profiles):
            if covers(profile, shapes):
                exact = all(tuple(shapes[name]) == opt for name, (_, opt, _) in profile.items())
                candidates.append(((not exact, _span(profile), _negated(record.created()), order, index), record))
    if not candidates:
        return None
    key, record = min(candidates, key=lambda item: item[0])
    return record, key[-1]


def _negated(created: str) -> float:
    """Sort key putting later builds first (a record without a readable timestamp last)."""
    try:
        return -datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def describe_profiles(records: Sequence[EngineRecord]) -> str:
    """The profiles of `records` as `key#index: input [lo..hi, ...]` lines (for "no profile covers" errors)."""
    lines = []
    for record in records:
        for index, profile in enumerate(record.profiles):
            dims = "; ".join(f"{name} [{', '.join(_dim(lo, hi) for lo, hi in zip(low, high))}]"
                             for name, (low, _, high) in profile.items())
            lines.append(f"  {record.key}#{index}: {dims}")
    return "\n".join(lines)


def _dim(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}..{high}"


# ----- writing (diffrt build-engines) -----
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
        temps.append(temp_file(folder, plan_path.name, plan))
        temps.append(temp_file(folder, record_path.name, text.encode()))
        os.replace(temps[0], plan_path)
        os.replace(temps[1], record_path)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return record_path
