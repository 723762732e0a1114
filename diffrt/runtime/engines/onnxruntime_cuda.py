"""ONNX Runtime on CUDA: provider options with clear names, device-resident IO, CUDA graph replay per shape.

A denoising loop feeds the UNet the same `encoder_hidden_states` (and SDXL `text_embeds` / `time_ids`) at every
step and new latents. `DeviceIO` keeps one set of device buffers per input-shape signature ("slot"): an input whose
values did not change since the slot's last run is not copied again, so a step moves only the latents and the
timestep host->device and the prediction back. With `cuda_graph=True` the slot's buffers are also the fixed
addresses ONNX Runtime's CUDA graph replays from (`gpu_graph_id` per slot; ORT warms up and captures inside the
first call). ORT does not support concurrent runs of a session that uses CUDA graphs, so graph slots run under one
lock; without graphs every thread checks out its own slot and ORT runs them concurrently, each on its own stream.

No torch and no cuda-python: the device count comes from the driver library itself (`libcuda.so.1`).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from diffrt.errors import ConfigError, EngineError, invalid

logger = logging.getLogger(__name__)

CONV_ALGO_SEARCH = {"exhaustive": "EXHAUSTIVE", "heuristic": "HEURISTIC", "default": "DEFAULT"}
ARENA_GROWTH = {"requested": "kSameAsRequested", "power_of_two": "kNextPowerOfTwo"}
CUDA_PROVIDER = "CUDAExecutionProvider"
# Options the CUDA provider takes from diffrt's engine options, with their defaults (None: ORT's own default).
CUDA_OPTION_DEFAULTS: dict[str, Any] = {
    "device_id": 0,
    "cuda_graph": False,
    "prefer_nhwc": False,
    "conv_algo_search": "exhaustive",
    "tf32": False,
    "gpu_memory_limit_mb": None,
    "arena_growth": "requested",
}


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA engine options; `provider_options()` gives ONNX Runtime's names for them.

    device_id: the CUDA device. cuda_graph: True (replay each input shape as a CUDA graph), False, or "auto" (try,
    and run without graphs if this model cannot be captured). prefer_nhwc: let ORT run convolutions channels-last
    (Tensor Cores' native layout). conv_algo_search: cuDNN's algorithm choice per convolution shape, "exhaustive"
    (benchmarks every algorithm on the first run of a shape), "heuristic" or "default". tf32: TensorFloat-32 for
    float32 MatMul/Conv (faster, ~1e-3 relative error; off so float32 packages match the CPU). gpu_memory_limit_mb:
    cap of ORT's device arena. arena_growth: "requested" (grow by what is asked: a long-lived service settles at its
    working set) or "power_of_two" (ORT's default: fewer, larger chunks).
    """

    device_id: int = 0
    cuda_graph: bool | str = False
    prefer_nhwc: bool = False
    conv_algo_search: str = "exhaustive"
    tf32: bool = False
    gpu_memory_limit_mb: int | None = None
    arena_growth: str = "requested"

    def __post_init__(self) -> None:
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise invalid("device_id", "an integer >= 0", self.device_id, ConfigError)
        if self.cuda_graph not in (True, False, "auto"):
            raise invalid("cuda_graph", "True, False or 'auto'", self.cuda_graph, ConfigError)
        for name in ("prefer_nhwc", "tf32"):
            if not isinstance(getattr(self, name), bool):
                raise invalid(name, "True or False", getattr(self, name), ConfigError)
        if self.conv_algo_search not in CONV_ALGO_SEARCH:
            raise invalid("conv_algo_search", f"one of {', '.join(CONV_ALGO_SEARCH)}", self.conv_algo_search,
                          ConfigError)
        if self.arena_growth not in ARENA_GROWTH:
            raise invalid("arena_growth", f"one of {', '.join(ARENA_GROWTH)}", self.arena_growth, ConfigError)
        limit = self.gpu_memory_limit_mb
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise invalid("gpu_memory_limit_mb", "None or an integer >= 1", limit, ConfigError)

    def provider_options(self, graphs: bool) -> dict[str, str]:
        options = {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": CONV_ALGO_SEARCH[self.conv_algo_search],
            "cudnn_conv_use_max_workspace": "1",
            "do_copy_in_default_stream": "1",
            "prefer_nhwc": "1" if self.prefer_nhwc else "0",
            "use_tf32": "1" if self.tf32 else "0",
            "arena_extend_strategy": ARENA_GROWTH[self.arena_growth],
            "enable_cuda_graph": "1" if graphs else "0",
        }
        if self.gpu_memory_limit_mb is not None:
            options["gpu_mem_limit"] = str(self.gpu_memory_limit_mb * 2**20)
        return options


def split_cuda_options(options: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the CUDA options from an engine's keyword options."""
    return {name: options.pop(name) for name in list(options) if name in CUDA_OPTION_DEFAULTS}


def check_cuda_only(given: Mapping[str, Any], provider: str) -> None:
    """A CUDA option given to another provider is a mistake worth naming (it would silently do nothing)."""
    changed = [name for name, value in given.items() if value != CUDA_OPTION_DEFAULTS[name]]
    if changed:
        raise ConfigError(f"`{changed[0]}` is an option of provider 'cuda' (ONNX Runtime CUDA); got provider "
                          f"{provider!r}")


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries installed as Python packages (nvidia-*), as ORT's docs advise for pip
    installs; a machine with them on the library path needs nothing (failures are left to session creation)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as error:  # ORT raises plain exceptions for a missing package; the session says more later
        logger.debug("onnxruntime.preload_dlls: %s", error)


def cuda_device_count() -> int:
    """CUDA devices the driver sees; 0 without a driver (no torch, no cuda-python: the driver API via ctypes)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def cuda_usable() -> bool:
    """ONNX Runtime here has the CUDA provider and the machine has a CUDA device."""
    return CUDA_PROVIDER in ort.get_available_providers() and cuda_device_count() > 0


class _Slot:
    """Device buffers and an IO binding for one input-shape signature."""

    def __init__(self, session: ort.InferenceSession, device: str, device_id: int, graph_id: int | None,
                 feeds: Mapping[str, np.ndarray], output_names: Sequence[str]):
        self.device, self.device_id, self.graph_id = device, device_id, graph_id
        self.output_names = list(output_names)
        self.binding = session.io_binding()
        self.inputs: dict[str, ort.OrtValue] = {}
        self.uploaded: dict[str, np.ndarray] = {}
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, device, device_id)
            self.inputs[name] = value
            self.binding.bind_ortvalue_input(name, value)
        self.outputs: list[ort.OrtValue] | None = None
        self.runs = 0

    def upload(self, feeds: Mapping[str, np.ndarray]) -> int:
        """Copy the inputs whose values changed since this slot's last run; returns the bytes copied.

        A read-only array that owns its data (what a pipeline's denoising loop passes for its per-call conditioning)
        cannot change while it is the same object, so it is recognised by identity; any other array by value.
        """
        copied = 0
        for name, array in feeds.items():
            last = self.uploaded.get(name)
            if last is not None and (last is array and _frozen(array) or np.array_equal(last, array)):
                continue
            array = np.ascontiguousarray(array)
            self.inputs[name].update_inplace(array)
            self.uploaded[name] = array if _frozen(array) else array.copy()
            copied += array.nbytes
        return copied

    def run(self, session: ort.InferenceSession) -> list[ort.OrtValue]:
        """Run on the bound buffers; the outputs as device values (valid until this slot's next run)."""
        if self.outputs is None:
            # The first run learns the output shapes (ORT allocates them); later runs write into fixed buffers,
            # which a CUDA graph needs. It runs outside any graph (id -1) so the capture sees the final binding.
            for name in self.output_names:
                self.binding.bind_output(name, self.device, self.device_id)
            session.run_with_iobinding(self.binding, _run_options(-1 if self.graph_id is not None else None))
            produced = self.binding.get_outputs()
            self.outputs = []
            for name, value in zip(self.output_names, produced):
                fixed = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), _numpy_dtype(value), self.device,
                                                                  self.device_id)
                self.binding.bind_ortvalue_output(name, fixed)
                self.outputs.append(fixed)
            self.runs += 1
            return list(produced)
        session.run_with_iobinding(self.binding, _run_options(self.graph_id))
        self.runs += 1
        return list(self.outputs)

    def to_host(self, values: Sequence[ort.OrtValue]) -> list[np.ndarray]:
        # A CUDA value's numpy() is a fresh host copy; a CPU value's is a view of the buffer the next run
        # overwrites, so it is copied.
        arrays = [value.numpy() for value in values]
        return [array.copy() for array in arrays] if self.device == "cpu" else arrays


def _frozen(array: np.ndarray) -> bool:
    return not array.flags.writeable and array.flags.owndata


@functools.lru_cache(maxsize=64)
def _run_options(graph_id: int | None) -> ort.RunOptions | None:
    if graph_id is None:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


_ORT_ELEMENT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _numpy_dtype(value: ort.OrtValue) -> np.dtype:
    kind = value.data_type()
    if kind not in _ORT_ELEMENT_DTYPES:
        raise EngineError(f"an output of type {kind} cannot be returned as a numpy array")
    return np.dtype(_ORT_ELEMENT_DTYPES[kind])


class DeviceIO:
    """Runs a session with its inputs and outputs in device buffers kept per input-shape signature.

    `device` is "cuda" in production; "cpu" runs the same bookkeeping on ONNX Runtime's CPU provider (tests).
    `graphs`: replay each signature as a CUDA graph (one graph id per signature, serialised runs).
    `max_slots`: signatures kept; the least recently used one is dropped beyond it (its graph stays captured in
    ORT until the session is released, so a service with many sizes should bound its sizes or skip graphs).
    """

    def __init__(self, session: ort.InferenceSession, output_names: Sequence[str], device: str = "cuda",
                 device_id: int = 0, graphs: bool = False, max_slots: int = 16):
        self.session = session
        self.output_names = list(output_names)
        self.device, self.device_id, self.graphs = device, device_id, graphs
        self.max_slots = max_slots
        self._lock = threading.Lock()
        self._free: dict[tuple, list[_Slot]] = {}
        self._graph_slots: dict[tuple, _Slot] = {}
        self._next_graph_id = 1  # 0 is reserved by ORT; -1 means "no graph"
        #: bytes copied host->device by the last run (the scheduler's NumPy latents, the timestep)
        self.last_upload_bytes = 0
        #: seconds the last run spent copying inputs to the device and outputs back (inside `run`)
        self.last_transfer_seconds = 0.0

    @staticmethod
    def signature(feeds: Mapping[str, np.ndarray]) -> tuple:
        return tuple(sorted((name, array.shape, array.dtype.str) for name, array in feeds.items()))

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        key = self.signature(feeds)
        if self.graphs:
            with self._lock:
                slot = self._graph_slots.get(key)
                if slot is None:
                    slot = self._new_graph_slot(key, feeds)
                return self._run_slot(slot, feeds)
        slot = self._checkout(key, feeds)
        try:
            return self._run_slot(slot, feeds)
        finally:
            with self._lock:
                self._free.setdefault(key, []).append(slot)

    def _run_slot(self, slot: _Slot, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        uploaded = slot.upload(feeds)
        copied_in = time.perf_counter()
        values = slot.run(self.session)
        ran = time.perf_counter()
        arrays = slot.to_host(values)
        self.last_upload_bytes = uploaded
        self.last_transfer_seconds = (copied_in - start) + (time.perf_counter() - ran)
        return arrays

    def _new_graph_slot(self, key: tuple, feeds: Mapping[str, np.ndarray]) -> _Slot:
        if len(self._graph_slots) >= self.max_slots:
            oldest = next(iter(self._graph_slots))
            logger.warning("more than %d input shapes replayed as CUDA graphs; dropping the buffers of %s",
                           self.max_slots, oldest)
            del self._graph_slots[oldest]
        slot = _Slot(self.session, self.device, self.device_id, self._next_graph_id, feeds, self.output_names)
        self._next_graph_id += 1
        self._graph_slots[key] = slot
        return slot

    def _checkout(self, key: tuple, feeds: Mapping[str, np.ndarray]) -> _Slot:
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            if len(self._free) >= self.max_slots and key not in self._free:
                self._free.pop(next(iter(self._free)))
        return _Slot(self.session, self.device, self.device_id, None, feeds, self.output_names)
