"""Export stage: diffusers checkpoints -> model packages (ONNX), and ONNX -> TensorRT engines.

The names below are imported on first use: `export_pipeline` needs torch (the `export` extra), while
`build_engines` runs on the GPU box with TensorRT alone, so `diffrt build-engines` must not pull torch in.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "export_pipeline": "diffrt.export.pipeline",
    "check_options": "diffrt.export.pipeline",
    "add_tiny_vae": "diffrt.export.tiny_vae",
    "build_engines": "diffrt.export.tensorrt",
    "COMPONENTS": "diffrt.export.onnx",
    "TARGET_OPSETS": "diffrt.export.onnx",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'diffrt.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
