"""Export stage: diffusers checkpoints -> model packages (ONNX), and ONNX -> TensorRT engines.

The names below are imported on first use: `export_pipeline` needs torch (the `export` extra), while
`build_engines` runs on the GPU box with TensorRT alone, so `diffrt build-engines` must not pull torch in.
"""
from __future__ import annotations

from diffrt._lazy import lazy_names

_LAZY: dict[str, str] = {
    "export_pipeline": "diffrt.export.exporter",
    "add_parameter_maps": "diffrt.export.exporter",
    "check_options": "diffrt.export.component",
    "add_tiny_vae": "diffrt.export.taesd",
    "add_controlnets": "diffrt.export.controlnet",
    "build_engines": "diffrt.export.tensorrt",
    "COMPONENTS": "diffrt.export.onnx",
    "TARGET_OPSETS": "diffrt.export.onnx",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
