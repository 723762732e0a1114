"""Memory-mapped weight files and the resident set: what an engine maps, how much of it is resident, and trimming.

Issue #19: OpenVINO memory-maps a model's ONNX external data (and the compiled-model cache blob it imports), repacks
every weight into its own buffers while compiling, and keeps the mapping for the compiled model's lifetime. The
compile reads every page of the mapping, so a fp32 SD 1.5 UNet was resident twice (3.2 GiB of mapped file + 3.3 GiB
of repacked weights) and three times on a cache hit (+3.2 GiB of blob), although a static-shape model's inference
never reads the mapping again (a dynamic-shape one reads part of it in place). `madvise(MADV_DONTNEED)` on a shared,
read-only file mapping drops its pages from this process's resident set without changing what it maps: the file's
pages stay in the page cache, and a later read faults them back in (a minor fault, no disk read while the page cache
holds them). A shared read-only mapping has no private copies to lose, so this is safe for any such mapping;
mappings that are writable or private are never touched.
Linux only (`/proc/self/maps`); elsewhere every function here finds no mappings and does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

#: how often `trimming` drops the pages a running compilation has read (seconds): at the compile's read rate a
#: few hundred MiB are resident between two passes, against GiBs without it (docs/benchmarks.md)
TRIM_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start


def _under(path: str, folders: Iterable[Path]) -> bool:
    return any(path == str(folder) or path.startswith(str(folder).rstrip(os.sep) + os.sep) for folder in folders)


def shared_readonly_mappings(folders: Iterable[str | Path]) -> list[Mapping]:
    """This process's shared, read-only mappings of files under `folders` (from /proc/self/maps)."""
    roots = [Path(folder).resolve() for folder in folders]
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        perms, path = parts[1], parts[5]
        if perms[1] == "w" or perms[3] != "s" or not _under(path, roots):
            continue
        start, end = (int(value, 16) for value in parts[0].split("-"))
        found.append(Mapping(start, end, path))
    return found


def resident_bytes(folders: Iterable[str | Path]) -> int:
    """Bytes of files under `folders` resident in this process through any mapping (/proc/self/smaps `Rss`)."""
    roots = [Path(folder).resolve() for folder in folders]
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    total, counting = 0, False
    for line in lines:
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's header line
            counting = len(head) == 6 and _under(head[5], roots)
        elif counting and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _madvise() -> Any:
    """libc's madvise, or None where there is none (not a POSIX libc)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


def trim(folders: Iterable[str | Path]) -> int:
    """Drop the resident pages of this process's shared read-only mappings of files under `folders`; returns the
    bytes of address space advised (mapped, not necessarily resident)."""
    if _MADVISE is None or _DONTNEED is None:
        return 0
    advised = 0
    for mapping in shared_readonly_mappings(folders):
        if _MADVISE(mapping.start, mapping.size, _DONTNEED) == 0:
            advised += mapping.size
        else:  # the mapping went away between reading the maps and advising it: nothing resident to drop
            logger.debug("madvise(%s) failed: errno %d", mapping.path, ctypes.get_errno())
    return advised


@contextlib.contextmanager
def trimming(folders: Iterable[str | Path], interval: float = TRIM_INTERVAL_S) -> Iterator[None]:
    """Trim the mappings under `folders` every `interval` seconds while the body runs (a compilation, which
    releases the GIL), and once after it."""
    roots = list(folders)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            trim(roots)

    worker = threading.Thread(target=loop, name="diffrt-trim-mappings", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        trim(roots)


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None elsewhere (musl, macOS, Windows)."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_MALLOC_TRIM = _malloc_trim()


def release_freed_heap() -> None:
    """Hand the heap's free pages back to the system (glibc `malloc_trim(0)`; a no-op without glibc). glibc keeps
    freed chunks below the top of its heaps for reuse, and some transients are large: ONNX Runtime copies a LoRA
    variant's overrides into a session, packs them and frees the copies, about 1 GiB for an SD 1.5 UNet that stayed
    resident (measured: a variant added 4.35 GiB next to a base session, 3.30 GiB after the trim)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
