"""An ONNX model file's graph inputs and outputs (names, element types, shapes), read from its protobuf directly.

Why not `onnx` or an engine session: the runtime does not depend on `onnx`, and creating a session compiles the
model (seconds for a UNet), while opening a package must stay cheap and must find a wrong file before any engine is
built. The inputs and outputs sit in the graph's header fields; everything else (nodes, initializers, which can be
gigabytes inside model.onnx) is skipped by its length without being read. Only the few ONNX protobuf fields named
below are decoded (onnx/onnx.proto: ModelProto.ir_version = 1, graph = 7; GraphProto.initializer = 5,
input = 11, output = 12; ValueInfoProto.name = 1, type = 2; TypeProto.tensor_type = 1; Tensor.elem_type = 1,
shape = 2; TensorShapeProto.dim = 1; Dimension.dim_value = 1, dim_param = 2; TensorProto.name = 8). `read_graph_nodes`
also reads GraphProto.node = 1: NodeProto.input = 1, output = 2, op_type = 4, attribute = 5, domain = 7;
AttributeProto.g = 6, graphs = 11.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from diffrt.errors import PackageError

# onnx.TensorProto.DataType -> numpy-style dtype name ("bfloat16" has no numpy dtype but is a valid graph type)
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
              9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
# A graph's inputs and outputs are a few hundred bytes each; anything larger is not a ValueInfoProto we read.
_MAX_VALUE_INFO = 1 << 20

GraphDim = int | str | None


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output: fixed dims are ints, symbolic dims their name, unknown dims None."""

    name: str
    dtype: str
    shape: tuple[GraphDim, ...] | None  # None: the graph gives no shape (rank unknown)


def read_graph_io(path: str | Path) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """(inputs, outputs) of the ONNX model at `path`; graph inputs that are initializers (ONNX IR < 4) left out.

    Raises PackageError naming the file when it is not a readable ONNX model.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            size = path.stat().st_size
            graph, ir_version = None, 0
            for field, wire, offset, length in _fields(stream, 0, size):
                if field == 1 and wire == _VARINT:
                    ir_version = length
                elif field == 7 and wire == _BYTES:
                    graph = (offset, offset + length)
            if graph is None:
                raise PackageError(f"{path} is not an ONNX model: it has no graph")
            # Only IR < 4 lists initializers among the inputs: later graphs need not have their names read.
            inputs, outputs, initializers = _graph_io(stream, *graph, initializer_names=ir_version < 4)
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        raise PackageError(f"{path} is not a readable ONNX model (damaged or truncated?): {error}") from None
    except OSError as error:
        raise PackageError(f"cannot read {path}: {error}") from None
    if not outputs:
        raise PackageError(f"{path} is not an ONNX model: its graph has no outputs")
    return [tensor for tensor in inputs if tensor.name not in initializers], outputs


@dataclass(frozen=True)
class GraphNode:
    """One node of the top-level graph: what it runs and which values it reads ("" for an omitted input)."""

    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: an attribute holds a graph (If, Loop, Scan), whose nodes may read the outer graph's values too
    has_subgraph: bool


def read_graph_nodes(path: str | Path) -> tuple[list[GraphNode], set[str]]:
    """(the nodes of the ONNX model's top-level graph, in the file's order, which ONNX requires topological;
    the names of its initializers); PackageError naming the file when it is not readable."""
    path = Path(path)
    nodes: list[GraphNode] = []
    initializers: set[str] = set()
    try:
        with open(path, "rb") as stream:
            for field, wire, offset, length in graph_fields(stream, path):
                if field == 1 and wire == _BYTES:
                    nodes.append(_node(io.BytesIO(_read(stream, offset, offset + length)), length))
                elif field == 5 and wire == _BYTES:  # TensorProto.name (8) comes before its raw data (9)
                    name = _find_field(stream, offset, offset + length, 8, stop_after_bytes=True)
                    if name is not None:
                        initializers.add(_read(stream, *name).decode())
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        raise PackageError(f"{path} is not a readable ONNX model (damaged or truncated?): {error}") from None
    except OSError as error:
        raise PackageError(f"cannot read {path}: {error}") from None
    return nodes, initializers


def _node(stream: BinaryIO, size: int) -> GraphNode:
    op_type, domain, subgraph = "", "", False
    inputs: list[str] = []
    outputs: list[str] = []
    for field, wire, offset, length in _fields(stream, 0, size):
        if wire != _BYTES:
            continue
        if field in (1, 2):
            (inputs if field == 1 else outputs).append(_read(stream, offset, offset + length).decode())
        elif field == 4:
            op_type = _read(stream, offset, offset + length).decode()
        elif field == 7:
            domain = _read(stream, offset, offset + length).decode()
        elif field == 5 and not subgraph:
            subgraph = any(f in (6, 11) and w == _BYTES for f, w, _, _ in _fields(stream, offset, offset + length))
    return GraphNode(op_type, domain, tuple(inputs), tuple(outputs), subgraph)


def _graph_io(stream: BinaryIO, start: int, end: int,
              initializer_names: bool) -> tuple[list[GraphTensor], list[GraphTensor], set[str]]:
    inputs: list[GraphTensor] = []
    outputs: list[GraphTensor] = []
    initializers: set[str] = set()
    for field, wire, offset, length in _fields(stream, start, end):
        if wire != _BYTES or field not in (5, 11, 12) or (field == 5 and not initializer_names):
            continue
        if field == 5:  # initializer: only its name (TensorProto.name = 8), and only if it comes before its data
            name = _find_field(stream, offset, offset + length, 8, stop_after_bytes=True)
            if name is not None:
                initializers.add(_read(stream, *name).decode())
            continue
        if length > _MAX_VALUE_INFO:
            raise ValueError(f"graph {'input' if field == 11 else 'output'} entry of {length} bytes")
        tensor = _value_info(io.BytesIO(_read(stream, offset, offset + length)), length)
        (inputs if field == 11 else outputs).append(tensor)
    return inputs, outputs, initializers


def _value_info(stream: BinaryIO, size: int) -> GraphTensor:
    name, dtype, shape = "", "undefined", None
    for field, wire, offset, length in _fields(stream, 0, size):
        if field == 1 and wire == _BYTES:
            name = _read(stream, offset, offset + length).decode()
        elif field == 2 and wire == _BYTES:
            tensor = _find_field(stream, offset, offset + length, 1)
            if tensor is not None:
                dtype, shape = _tensor_type(stream, *tensor)
    return GraphTensor(name, dtype, shape)


def _tensor_type(stream: BinaryIO, start: int, end: int) -> tuple[str, tuple[GraphDim, ...] | None]:
    dtype, shape = "undefined", None
    for field, wire, offset, length in _fields(stream, start, end):
        if field == 1 and wire == _VARINT:
            dtype = ELEM_TYPES.get(length, f"onnx type {length}")
        elif field == 2 and wire == _BYTES:
            shape = tuple(_dim(stream, o, o + n) for f, w, o, n in _fields(stream, offset, offset + length)
                          if f == 1 and w == _BYTES)
    return dtype, shape


def _dim(stream: BinaryIO, start: int, end: int) -> GraphDim:
    for field, wire, offset, length in _fields(stream, start, end):
        if field == 1 and wire == _VARINT:
            return length
        if field == 2 and wire == _BYTES:
            return _read(stream, offset, offset + length).decode() or None
    return None


# ----- protobuf wire format -----
def _fields(stream: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, payload offset, payload length, or the value itself for varints) of each field
    of the message in [start, end); payloads are skipped, not read."""
    position = start
    while position < end:
        stream.seek(position)
        tag, position = _varint(stream, position)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, position = _varint(stream, position)
            yield field, wire, position, value
            continue
        if wire == _BYTES:
            length, position = _varint(stream, position)
        elif wire in (_FIXED64, _FIXED32):
            length = 8 if wire == _FIXED64 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {position}")
        if position + length > end:
            raise ValueError(f"field {field} runs past the end of its message (byte {position + length} > {end})")
        yield field, wire, position, length
        position += length


def graph_fields(stream: BinaryIO, path: Path) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the model's GraphProto (ModelProto field 7) in the open file `path`; PackageError without one."""
    graph = _find_field(stream, 0, path.stat().st_size, 7)
    if graph is None:
        raise PackageError(f"{path} is not an ONNX model: it has no graph")
    return _fields(stream, *graph)


def _find_field(stream: BinaryIO, start: int, end: int, wanted: int,
                stop_after_bytes: bool = False) -> tuple[int, int] | None:
    """(start, end) of the first length-delimited field `wanted` in [start, end). `stop_after_bytes`: give up at
    the first large payload (a tensor's raw data), so an initializer's name is found without reading its data."""
    for field, wire, offset, length in _fields(stream, start, end):
        if field == wanted and wire == _BYTES:
            return offset, offset + length
        if stop_after_bytes and wire == _BYTES and length > _MAX_VALUE_INFO:
            return None
    return None


def _varint(stream: BinaryIO, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise EOFError(f"file ends inside a protobuf field at byte {position}")
        position += 1
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError(f"malformed varint before byte {position}")


def _read(stream: BinaryIO, start: int, end: int) -> bytes:
    stream.seek(start)
    data = stream.read(end - start)
    if len(data) != end - start:
        raise EOFError(f"file ends at byte {start + len(data)}, inside a field that ends at {end}")
    return data
