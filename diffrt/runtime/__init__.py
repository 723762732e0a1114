"""Torch-free inference on diffrt model packages: `DiffusionPipeline.from_pretrained(package)(prompt).images`.

Names are imported lazily so `import diffrt.runtime` stays fast; engines import their libraries on first use.
"""
from __future__ import annotations

from diffrt._lazy import lazy_names

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
    "StableDiffusion3Pipeline": f"{_P}.sd3",
    "StableDiffusion3Img2ImgPipeline": f"{_P}.sd3",
    "FluxPipeline": f"{_P}.flux",
    "FluxImg2ImgPipeline": f"{_P}.flux",
    "AutoPipelineForText2Image": f"{_P}.auto",
    "AutoPipelineForImage2Image": f"{_P}.auto",
    "AutoPipelineForInpainting": f"{_P}.auto",
    "ModelPackage": "diffrt.package.reader",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
