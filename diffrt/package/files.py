"""Reading JSON and writing files and folders atomically: the helpers every writer of diffrt uses.

A reader never sees a half-written file or package: each file is written to a temp file in its own folder and
renamed into place (`os.replace` is atomic within a file system), and a folder is built under a temp name beside
its target and renamed in; replacing an existing folder renames the old one aside first and deletes it only after
the new one is in place. Failed writes remove their temp files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from diffrt.errors import DiffrtError, PackageError
from diffrt.package.leftovers import remove_stale_temp, temp_prefix


def cache_root() -> Path:
    """diffrt's cache folder: `$DIFFRT_CACHE`, default `~/.cache/diffrt` (presets, quantized models, ...)."""
    return Path(os.environ.get("DIFFRT_CACHE") or Path.home() / ".cache" / "diffrt").expanduser()


def files_fingerprint(files: Sequence[Path], *extra: Any, length: int = 16) -> str:
    """A cache key for something derived from `files` and `extra` (versions, options): the files' resolved paths,
    sizes and modification times and the JSON of `extra`, hashed; a changed file or setting gives a new key."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    source = json.dumps([stats, *extra], sort_keys=True, default=str)
    return hashlib.sha256(source.encode()).hexdigest()[:length]

def read_json(path: Path, required: bool = False, error: type[DiffrtError] = PackageError) -> dict[str, Any]:
    """A JSON object from `path`; {} when absent and not `required`; a missing required file or corrupt JSON is
    `error` (PackageError for packages; the exporter reads checkpoints with ConfigError) naming the file."""
    if not path.is_file():
        if required:
            raise error(f"{path} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{path} is not valid JSON: {problem}") from problem
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object; got {type(data).__name__}")
    return data


def default_mode(directory: bool = False) -> int:
    """Permissions a plain mkdir / open would give under the current umask (mkdtemp / mkstemp use 0700 / 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_bytes(path: Path, data: bytes | bytearray | memoryview) -> None:
    """`data` to `path`: a temp file in the same folder, then os.replace; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_file(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any, indent: int = 2, allow_nan: bool = True) -> None:
    """JSON, atomically; the text is made before any file is touched (`allow_nan=False`: NaN is an error)."""
    write_text(path, json.dumps(data, indent=indent, allow_nan=allow_nan) + "\n")


def copy_file(source: Path, target: Path) -> None:
    """Copy one file atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        shutil.copyfile(source, temp)
        os.chmod(temp, default_mode())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def temp_file(folder: Path, name: str, data: bytes | bytearray | memoryview) -> Path:
    """`data` in a new temp file `.NAME.*.tmp` in `folder`, with the umask's permissions; removed if writing fails.
    The caller renames it into place (several files can be prepared before any is renamed)."""
    handle, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(memoryview(data))
        os.chmod(temp, default_mode())
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def temp_folder(beside: Path) -> Path:
    """A new empty folder `.NAME.tmp-PID@HOST-*` beside `beside` (same file system, so it can be renamed onto it).
    The name records the writing process, so a later writer can tell a killed run's leftover from a live one's
    (`remove_stale_temp`)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(beside.name, "tmp"), dir=beside.parent))
    os.chmod(folder, default_mode(directory=True))  # shared like any folder, not mkdtemp's 0700
    return folder


def replace_folder(source: Path, target: Path) -> None:
    """Rename the finished folder `source` to `target`. An existing `target` is renamed aside first and deleted only
    once `source` is in place; if that rename fails, the old folder is put back."""
    if not target.exists():
        os.replace(source, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name, "old"), dir=target.parent))
    os.replace(target, aside / target.name)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside / target.name, target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


class AtomicFolder:
    """`with AtomicFolder(target) as folder:` write into `folder` (a temp folder beside `target`); it replaces
    `target` when the block succeeds and is deleted when it fails. `check()` runs again right before the rename
    (the target may have appeared meanwhile). Temp folders that killed writers left beside `target` are removed
    first (`diffrt.package.leftovers`)."""

    def __init__(self, target: Path, check: Any = None):
        self.target = Path(target)
        self.check = check
        self.folder: Path | None = None

    def __enter__(self) -> Path:
        remove_stale_temp(self.target)
        self.folder = temp_folder(self.target)
        return self.folder

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        folder = self.folder
        if folder is None:
            return
        try:
            if kind is None:
                if self.check is not None and self.target.exists():
                    self.check()
                replace_folder(folder, self.target)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def files_sha256(paths: Sequence[Path], chunk: int = 1 << 24) -> str:
    """sha256 over the files' bytes in order (one file: its usual hex digest), read in chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            while block := stream.read(chunk):
                digest.update(block)
    return digest.hexdigest()
