"""Torch-free inference on diffrt model packages: `DiffusionPipeline.from_pretrained(package)(prompt).images`.

Names are imported lazily so `import diffrt.runtime` stays fast; engines import their libraries on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_P = "diffrt.runtime.pipelines"
_LAZY: dict[str, str] = {
    "DiffusionPipeline": f"{_P}.base",
    "PipelineOutput": f"{_P}.base",
    "StableDiffusionPipeline": f"{_P}.stable_diffusion",
    "StableDiffusionImg2ImgPipeline": f"{_P}.stable_diffusion",
    "LatentConsistencyModelPipeline": f"{_P}.stable_diffusion",
    "StableDiffusionInpaintPipeline": f"{_P}.inpaint",
    "StableDiffusionXLPipeline": f"{_P}.stable_diffusion_xl",
    "StableDiffusionXLImg2ImgPipeline": f"{_P}.stable_diffusion_xl",
    "StableDiffusionXLInpaintPipeline": f"{_P}.inpaint",
    "AutoPipelineForText2Image": f"{_P}.auto",
    "AutoPipelineForImage2Image": f"{_P}.auto",
    "AutoPipelineForInpainting": f"{_P}.auto",
    "ModelPackage": "diffrt.runtime.package",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffrt.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
