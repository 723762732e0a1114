"""Device memory a benchmark process uses, measured the same way for every side.

`nvidia-smi`'s per-process column is empty in containers that hide host PIDs, and PyTorch's allocator statistics
leave out the CUDA context, cuBLAS/cuDNN workspaces and everything ONNX Runtime allocates. So each side reads the
device's used memory (NVML) when its process starts and again after its first image, before the runner starts
the next side: the difference is what the side holds (CUDA context, weights, arenas, workspaces), since the sides
loaded before it hold still meanwhile. No torch and no pynvml: NVML through ctypes.
"""
from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)


class _MemoryInfo(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class DeviceMemoryProbe:
    """`used_mb()`: device memory in use now, less what was in use when the probe was made (None without NVML).

    NVML (the driver's management library) reads the device's memory without creating a CUDA context, so the
    baseline is taken before this process has one and the difference includes it.
    """

    def __init__(self, device_id: int = 0):
        self._nvml = None
        self._device = ctypes.c_void_p()
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if nvml.nvmlInit_v2() == 0 and nvml.nvmlDeviceGetHandleByIndex_v2(device_id,
                                                                              ctypes.byref(self._device)) == 0:
                self._nvml = nvml
        except (OSError, AttributeError):
            pass
        self._baseline = self._used_bytes()

    def _used_bytes(self) -> int | None:
        if self._nvml is None:
            return None
        info = _MemoryInfo()
        if self._nvml.nvmlDeviceGetMemoryInfo(self._device, ctypes.byref(info)) != 0:
            return None
        return int(info.used)

    def used_mb(self) -> float | None:
        used = self._used_bytes()
        if used is None or self._baseline is None:
            return None
        return max(used - self._baseline, 0) / 2**20
