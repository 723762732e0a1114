"""One copy of a model file's weights for every ONNX Runtime CPU session of it in this process (`share_weights`).

ONNX Runtime's Python API has no pre-packed-weights container (`CreateSessionWithPrepackedWeightsContainer` is C
API only), but `SessionOptions.add_initializer` takes an `OrtValue` whose CPU buffer the session then uses in place:
the session state keeps a shallow copy pointing at the caller's buffer (measured: one buffer serves every session
given it). `SharedWeights` makes such values for a model file's floating-point initializers, as read-only views of a
memory map of the file that holds their bytes (model.onnx itself, or its external data), so they cost page cache,
not heap, shared with any other process reading the same package. An initializer whose bytes are not aligned to its
element size inside model.onnx is copied once into an aligned array, still one copy for all sessions.

Only initializers ONNX Runtime reads in place are handed out (`in_place`): what a session derives from a weight
stays its own whatever it is given (pre-packed GEMM weights unless `prepack_weights=False`, level "all"'s NCHWc
convolution weights unless `disabled_optimizers=["NchwcTransformer"]`, constant-folded values), so handing those
out would only add a mapped or copied original beside the session's derived copy. Without sharing, ONNX Runtime
copies weights kept inside model.onnx into each session and memory-maps external data itself (one mapping per
session: RSS counts its pages once per session, the page cache holds them once); docs/benchmarks.md, "Sharing
weights between sessions", has the measurements.

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
from diffrt.package.onnx_io import GraphNode, read_graph_nodes
from diffrt.package.weights import locate_initializers

logger = logging.getLogger(__name__)

#: (domain, op type, input index) of weights ONNX Runtime's CPU kernels pre-pack into a buffer of their own
PREPACKED_INPUTS = {
    ("", "MatMul", 1), ("", "Gemm", 1), ("com.microsoft", "FusedMatMul", 1), ("", "ConvTranspose", 1),
    ("com.microsoft", "Attention", 1), ("", "LSTM", 1), ("", "LSTM", 2), ("", "GRU", 1), ("", "GRU", 2),
    ("", "RNN", 1), ("", "RNN", 2), ("", "MatMulInteger", 1), ("", "QLinearMatMul", 3), ("", "QLinearConv", 3),
    ("com.microsoft", "MatMulNBits", 1), ("com.microsoft", "DynamicQuantizeMatMul", 1),
    ("com.microsoft", "NhwcFusedConv", 1),
}
#: convolutions whose weights level "all"'s NCHWc layout pass rewrites into reordered copies
NCHWC_CONVOLUTIONS = {("", "Conv"), ("com.microsoft", "FusedConv")}


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
    """The floating-point initializers of one model file, as `OrtValue`s over read-only memory maps, made when a
    session first asks for them and then handed to every session of the file."""

    def __init__(self, model: Path) -> None:
        self.model = model
        try:
            stored = locate_initializers(model, None, skip_typed=True)
            self._nodes, self._constants = read_graph_nodes(model)
        except PackageError as error:
            raise EngineError(f"cannot share the weights of {model}: {error}") from error
        # bfloat16 has no NumPy type (read as its uint16 bits): an OrtValue of those would have the wrong type.
        self._stored = {name: where for name, where in stored.items() if where.dtype.kind == "f"}
        sources = sorted({where.file for where in self._stored.values()} | {model})
        #: the identity of model.onnx and of each file holding its weights when they were mapped
        self.files = tuple(FileIdentity.of(path) for path in sources)
        self._maps = {path: _map(path) for path in sources if path.stat().st_size > 0}
        self._in_place: dict[tuple[bool, bool, bool], frozenset[str]] = {}
        self._lock = threading.Lock()
        #: the values handed out so far, by initializer name
        self.values: dict[str, ort.OrtValue] = {}
        self.nbytes = 0
        self.copied_bytes = 0

    def for_session(self, *, prepack: bool, reorders_convolutions: bool, folds_constants: bool,
                    skip: frozenset[str] = frozenset()) -> dict[str, ort.OrtValue]:
        """The values a session with these settings reads in place (`in_place`), less the names in `skip`."""
        names = self.in_place(prepack, reorders_convolutions, folds_constants) - skip
        with self._lock:
            for name in names - self.values.keys():
                self.values[name] = self._value(name)
            return {name: self.values[name] for name in names}

    def in_place(self, prepack: bool, reorders_convolutions: bool, folds_constants: bool) -> frozenset[str]:
        """The initializers every consumer of which ONNX Runtime reads as they are (see the module docstring)."""
        key = (prepack, reorders_convolutions, folds_constants)
        if key not in self._in_place:
            self._in_place[key] = read_in_place(self._nodes, self._constants, *key).intersection(self._stored)
        return self._in_place[key]

    def current(self) -> bool:
        """Whether every file still is the one that was mapped (a re-exported package is mapped afresh)."""
        try:
            return all(FileIdentity.of(Path(identity.path)) == identity for identity in self.files)
        except OSError:
            return False

    def _value(self, name: str) -> ort.OrtValue:
        where = self._stored[name]
        count = int(np.prod(where.shape)) if where.shape else 1
        array = np.frombuffer(self._maps[where.file], dtype=where.dtype, count=count, offset=where.offset)
        if array.ctypes.data % where.dtype.itemsize:
            array = np.array(array)  # protobuf keeps inline bytes wherever they fall
            self.copied_bytes += array.nbytes
        self.nbytes += array.nbytes
        return ort.OrtValue.ortvalue_from_numpy(array.reshape(where.shape))

    def __repr__(self) -> str:
        return f"SharedWeights({str(self.model)!r}, {len(self.values)} handed out, {self.nbytes / 2**20:.1f} MiB)"


def read_in_place(nodes: list[GraphNode], initializers: set[str], prepack: bool, reorders_convolutions: bool,
                  folds_constants: bool) -> frozenset[str]:
    """Which `initializers` every reading node uses as stored: not pre-packed (`prepack`), not reordered by the
    NCHWc pass (`reorders_convolutions`), not folded with other constants into a new value (`folds_constants`: a
    node whose inputs are all constants, followed through the graph). A fusion may still replace a node: a shared
    value then goes unused (memory, not results: ONNX Runtime's optimisers write what they compute under new names,
    and a session only reads a given value for a name its final graph still has)."""
    if any(node.has_subgraph for node in nodes):
        return frozenset()  # a subgraph's nodes read the outer graph's values by name: not followed here
    constants = set(initializers)
    derived: set[str] = set()
    used: set[str] = set()
    for node in nodes:  # in topological order
        folded = folds_constants and all(name in constants for name in node.inputs if name)
        if folded:
            constants.update(node.outputs)
        for index, name in enumerate(node.inputs):
            if name not in initializers:
                continue
            used.add(name)
            if folded or (prepack and (node.domain, node.op_type, index) in PREPACKED_INPUTS) or (
                    reorders_convolutions and (node.domain, node.op_type) in NCHWC_CONVOLUTIONS):
                derived.add(name)
    return frozenset(used - derived)


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as stream:
        return mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)


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


__all__ = ["FileIdentity", "NCHWC_CONVOLUTIONS", "PREPACKED_INPUTS", "SharedWeights", "live_shared_weights",
           "read_in_place", "shared_weights"]
