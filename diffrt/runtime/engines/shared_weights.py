"""One copy of a model file's weights for every ONNX Runtime CPU session of it in this process (`share_weights`).

ONNX Runtime's Python API has no pre-packed-weights container (`CreateSessionWithPrepackedWeightsContainer` is C
API only), but `SessionOptions.add_initializer` takes an `OrtValue` whose CPU buffer the session then uses in place:
the session state keeps a shallow copy pointing at the caller's buffer (measured: the same buffer serves every
session given it, and a write to it shows in the next run). `SharedWeights` holds such values for every raw
floating-point initializer of one model file, as read-only views of a memory map of the file that holds its bytes
(model.onnx itself, or its external data), so they cost page cache, not heap, and the pages are shared with any other
process reading the same package. An initializer whose bytes are not aligned to its element size inside model.onnx
is copied once into an aligned array, still one copy for all sessions.

What a session derives from a weight stays its own (docs/benchmarks.md, "Sharing weights between sessions"):
pre-packed GEMM weights (`prepack_weights=False` turns that off), the NCHWc layout pass's reordered convolution
weights (level "all"; `disabled_optimizers=["NchwcTransformer"]`), and constant-folded values.

Lifetimes: ONNX Runtime keeps raw pointers into these buffers, so an entry must outlive every session built with
it. The engine stores the entry on the session object itself; the registry holds entries weakly, so an entry (and
its memory maps) goes away with the last session using it, and the next session of that file maps it again.
"""
from __future__ import annotations

import logging
import mmap
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from diffrt.errors import EngineError, PackageError
from diffrt.package.weights import Stored, locate_initializers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileIdentity:
    """What makes two opens of a path the same bytes: the file (device, inode) and its size and mtime."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileIdentity":
        stat = path.stat()
        return cls(str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class SharedWeights:
    """The initializers of one model file as `OrtValue`s over read-only memory maps (see the module docstring)."""

    def __init__(self, model: Path) -> None:
        self.model = model
        try:
            stored = locate_initializers(model, None, skip_typed=True)
        except PackageError as error:
            raise EngineError(f"cannot share the weights of {model}: {error}") from error
        # bfloat16 has no NumPy type (read as its uint16 bits): an OrtValue of those would have the wrong type.
        stored = {name: where for name, where in stored.items() if where.dtype.kind == "f"}
        sources = sorted({where.file for where in stored.values()} | {model})
        #: the identity of model.onnx and of each file holding its weights when they were mapped
        self.files = tuple(FileIdentity.of(path) for path in sources)
        maps = {path: _map(path) for path in sources if path.stat().st_size > 0}
        self.values: dict[str, ort.OrtValue] = {}
        self.nbytes = 0
        self.copied_bytes = 0
        for name, where in stored.items():
            array = _view(maps[where.file], where)
            if array.ctypes.data % where.dtype.itemsize:
                array = np.array(array)  # protobuf keeps inline bytes wherever they fall
                self.copied_bytes += array.nbytes
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
            self.nbytes += array.nbytes
        logger.debug("mapped %d initializers of %s (%.1f MiB, %.1f MiB copied for alignment)", len(self.values),
                     model, self.nbytes / 2**20, self.copied_bytes / 2**20)

    def current(self) -> bool:
        """Whether every file still is the one that was mapped (a re-exported package is mapped afresh)."""
        try:
            return all(FileIdentity.of(Path(identity.path)) == identity for identity in self.files)
        except OSError:
            return False

    def __repr__(self) -> str:
        return f"SharedWeights({str(self.model)!r}, {len(self.values)} initializers, {self.nbytes / 2**20:.1f} MiB)"


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as stream:
        return mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)


def _view(mapped: mmap.mmap, where: Stored) -> np.ndarray:
    count = int(np.prod(where.shape)) if where.shape else 1
    return np.frombuffer(mapped, dtype=where.dtype, count=count, offset=where.offset).reshape(where.shape)


_lock = threading.Lock()
_entries: weakref.WeakValueDictionary[FileIdentity, SharedWeights] = weakref.WeakValueDictionary()


def shared_weights(model: str | Path) -> SharedWeights:
    """The process's `SharedWeights` of the ONNX file `model`, mapped on first use; the caller keeps it alive for as
    long as a session built with its values exists."""
    model = Path(model)
    key = FileIdentity.of(model)
    with _lock:
        found = _entries.get(key)
        if found is not None and found.current():
            return found
        made = SharedWeights(model)
        _entries[key] = made
        return made


def live_shared_weights() -> list[SharedWeights]:
    """The entries some session still uses (for probes and tests)."""
    with _lock:
        return list(_entries.values())


def mapped_bytes() -> int:
    """Bytes of weights the live entries hand out (each counted once, however many sessions use it)."""
    return sum(entry.nbytes for entry in live_shared_weights())


__all__ = ["FileIdentity", "SharedWeights", "live_shared_weights", "mapped_bytes", "shared_weights"]
