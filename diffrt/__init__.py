"""diffrt: deploy diffusers checkpoints as ONNX / TensorRT model packages and run them without torch.

Public names are imported lazily so that ``import diffrt`` stays fast and never pulls torch.
"""
from __future__ import annotations

from diffrt._lazy import lazy_names

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "Generator": "diffrt.rng",
    "randn": "diffrt.rng",
    "DiffusionPipeline": "diffrt.runtime",
    "StableDiffusionPipeline": "diffrt.runtime",
    "StableDiffusionImg2ImgPipeline": "diffrt.runtime",
    "StableDiffusionInpaintPipeline": "diffrt.runtime",
    "StableDiffusionXLPipeline": "diffrt.runtime",
    "StableDiffusionXLImg2ImgPipeline": "diffrt.runtime",
    "StableDiffusionXLInpaintPipeline": "diffrt.runtime",
    "LatentConsistencyModelPipeline": "diffrt.runtime",
    "StableDiffusion3Pipeline": "diffrt.runtime",
    "StableDiffusion3Img2ImgPipeline": "diffrt.runtime",
    "FluxPipeline": "diffrt.runtime",
    "FluxImg2ImgPipeline": "diffrt.runtime",
    "AutoPipelineForText2Image": "diffrt.runtime",
    "AutoPipelineForImage2Image": "diffrt.runtime",
    "AutoPipelineForInpainting": "diffrt.runtime",
    "export_pipeline": "diffrt.export",
}

__all__ = sorted(_LAZY) + ["__version__"]


__getattr__, __dir__ = lazy_names(__name__, _LAZY, extra=("__version__",))
