"""Thin helpers over cuda-python's runtime API: error checks, device queries, buffers, streams, graphs.

cuda-python returns `(error, value...)` tuples instead of raising; `check` turns a failed call into an
`EngineError` naming the call and CUDA's error. The module is imported lazily (`cudart()`): `cuda.bindings.runtime`
in cuda-python >= 12.6, `cuda.cudart` before that. No torch, no pycuda.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any, Callable

import numpy as np

from diffrt.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'diffrt[tensorrt]'"


@functools.lru_cache(maxsize=1)
def cudart() -> Any:
    """cuda-python's runtime module; ConfigError naming the extra when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as error:
            raise ConfigError(
                f"provider 'trt' needs cuda-python (NVIDIA's CUDA bindings), which is not installed: {INSTALL_HINT}"
            ) from error
    return runtime


def _error_text(error: Any) -> str:
    rt = cudart()
    name = rt.cudaGetErrorName(error)[1]
    text = rt.cudaGetErrorString(error)[1]
    return f"{_text(name)}: {_text(text)}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def check(result: Any, what: str) -> Any:
    """`result` of a cuda-python call without its error code (None, the value, or a tuple of values)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart().cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA {what} failed ({_error_text(error)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def require_device(device_id: int = 0) -> None:
    """EngineError saying why CUDA cannot run here (no driver, no GPU, `device_id` out of range)."""
    rt = cudart()
    error, count = rt.cudaGetDeviceCount()
    if error != rt.cudaError_t.cudaSuccess:
        raise EngineError(f"provider 'trt' needs an NVIDIA GPU with a working driver; CUDA says {_error_text(error)}")
    if count == 0:
        raise EngineError("provider 'trt' needs an NVIDIA GPU; CUDA found none")
    if not 0 <= device_id < count:
        raise EngineError(f"`device_id` must be in [0, {count - 1}] (the CUDA devices here); got {device_id}")


def set_device(device_id: int) -> None:
    check(cudart().cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


def device_properties(device_id: int) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device `device_id`."""
    props = check(cudart().cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return str(name).strip(), f"{props.major}.{props.minor}"


def versions() -> dict[str, str]:
    """CUDA driver and runtime versions as "12.4" strings (for build records and benchmark reports)."""
    rt = cudart()

    def text(number: int) -> str:
        return f"{number // 1000}.{number % 1000 // 10}"

    return {"cuda_driver": text(check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")),
            "cuda_runtime": text(check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))}


def handle(obj: Any) -> int:
    """The raw address of a cuda-python handle (stream, pointer) as an int, as TensorRT's Python API takes it."""
    return obj if isinstance(obj, int) else int(obj)


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc), freed by `free`."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        # cudaMalloc(0) returns a null pointer, which TensorRT refuses as a tensor address.
        self.ptr = handle(check(cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) seen as a NumPy array: async copies need pinned memory."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = handle(check(cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})"))
        raw = memoryview((ctypes.c_char * max(self.nbytes, 1)).from_address(self.ptr)).cast("B")
        self.array = np.frombuffer(raw, dtype=self.dtype, count=self.nbytes // self.dtype.itemsize).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0, self.dtype)  # no view may outlive the memory
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class Stream:
    """A non-blocking CUDA stream (no implicit sync with the legacy default stream) and async copies on it."""

    def __init__(self) -> None:
        rt = cudart()
        self.stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self.handle = handle(self.stream)

    def upload(self, device: DeviceBuffer, host: PinnedBuffer) -> None:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(device.ptr, host.ptr, host.nbytes, kind, self.stream), "cudaMemcpyAsync (to device)")

    def download(self, host: PinnedBuffer, device: DeviceBuffer) -> None:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(host.ptr, device.ptr, host.nbytes, kind, self.stream), "cudaMemcpyAsync (to host)")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.stream is not None:
            check(cudart().cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


class Graph:
    """A CUDA graph captured from the work `enqueue` puts on `stream`, replayed with `launch`."""

    def __init__(self, stream: Stream, enqueue: Callable[[], None]) -> None:
        rt = cudart()
        # Thread-local capture: another thread's cudaMalloc (a second execution context) must not break it.
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.stream, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            # End the capture, or the stream stays in capture mode and every later call on it fails.
            error, graph = rt.cudaStreamEndCapture(stream.stream)
            if error == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        self.graph = check(rt.cudaStreamEndCapture(stream.stream), "cudaStreamEndCapture")
        graph = self.graph
        try:
            self.exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except EngineError:
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
            raise

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = cudart()
        if self.exec is not None:
            check(rt.cudaGraphExecDestroy(self.exec), "cudaGraphExecDestroy")
            check(rt.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
            self.exec = self.graph = None
