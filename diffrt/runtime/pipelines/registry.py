"""Which diffrt pipeline class serves a package, by its Diffusers pipeline class name or by task."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from diffrt.errors import PackageError

if TYPE_CHECKING:
    from diffrt.runtime.pipelines.base import DiffusionPipeline

_SD = "diffrt.runtime.pipelines.stable_diffusion"
_SDXL = "diffrt.runtime.pipelines.stable_diffusion_xl"
_INPAINT = "diffrt.runtime.pipelines.inpaint"
_CN = "diffrt.runtime.pipelines.controlnet"
_CN_SDXL = "diffrt.runtime.pipelines.controlnet_xl"
_SD3 = "diffrt.runtime.pipelines.sd3"
_FLUX = "diffrt.runtime.pipelines.flux"

# Diffusers class name -> "module:Class"
PIPELINES: dict[str, str] = {
    "StableDiffusionPipeline": f"{_SD}:StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline": f"{_SD}:StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": f"{_INPAINT}:StableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline": f"{_SD}:LatentConsistencyModelPipeline",
    "StableDiffusionXLPipeline": f"{_SDXL}:StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline": f"{_SDXL}:StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline": f"{_INPAINT}:StableDiffusionXLInpaintPipeline",
    "StableDiffusionControlNetPipeline": f"{_CN}:StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline": f"{_CN}:StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline": f"{_CN}:StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLControlNetPipeline": f"{_CN_SDXL}:StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLControlNetImg2ImgPipeline": f"{_CN_SDXL}:StableDiffusionXLControlNetImg2ImgPipeline",
    "StableDiffusion3Pipeline": f"{_SD3}:StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline": f"{_SD3}:StableDiffusion3Img2ImgPipeline",
    "FluxPipeline": f"{_FLUX}:FluxPipeline",
    "FluxImg2ImgPipeline": f"{_FLUX}:FluxImg2ImgPipeline",
}
# The pipeline class of a package that has ControlNets, by the class it had without (Diffusers' class pairs).
CONTROLNET_CLASSES: dict[str, str] = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLControlNetPipeline",
    "StableDiffusionXLImg2ImgPipeline": "StableDiffusionXLControlNetImg2ImgPipeline",
}

# task -> family -> Diffusers class name (what AutoPipelineFor* pick)
TASKS: dict[str, dict[str, str]] = {
    "text2image": {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                   "lcm": "LatentConsistencyModelPipeline", "sd3": "StableDiffusion3Pipeline",
                   "flux": "FluxPipeline"},
    "image2image": {"sd": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline",
                    "lcm": "StableDiffusionImg2ImgPipeline", "sd3": "StableDiffusion3Img2ImgPipeline",
                    "flux": "FluxImg2ImgPipeline"},
    "inpainting": {"sd": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
                   "sd_controlnet": "StableDiffusionControlNetInpaintPipeline"},
}
TASKS["text2image"].update(sd_controlnet="StableDiffusionControlNetPipeline",
                           sdxl_controlnet="StableDiffusionXLControlNetPipeline")
TASKS["image2image"].update(sd_controlnet="StableDiffusionControlNetImg2ImgPipeline",
                            sdxl_controlnet="StableDiffusionXLControlNetImg2ImgPipeline")


def normalize_class_name(name: str) -> str:
    """Optimum writes `ORTStableDiffusionPipeline`-style names; the model is the same."""
    return name[3:] if name.startswith("ORT") else name


def controlnet_class_for(class_name: str) -> str:
    """The ControlNet pipeline class for a package of `class_name` (unchanged if it is one already)."""
    name = normalize_class_name(class_name)
    if name in CONTROLNET_CLASSES.values():
        return name
    if name not in CONTROLNET_CLASSES:
        raise PackageError(f"diffrt has no ControlNet pipeline for a {name} package; it has ControlNet pipelines for "
                           f"{', '.join(CONTROLNET_CLASSES)}")
    return CONTROLNET_CLASSES[name]


def plain_class_for(class_name: str) -> str:
    """The class a ControlNet package runs as when a call uses none of its ControlNets (`class_name` otherwise)."""
    name = normalize_class_name(class_name)
    plain = {controlnet: plain for plain, controlnet in CONTROLNET_CLASSES.items()}
    return plain.get(name, name)


def family_of(class_name: str) -> str:
    name = normalize_class_name(class_name)
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if "ControlNet" in name:
        return "sdxl_controlnet" if "XL" in name else "sd_controlnet"
    if "XL" in name:
        return "sdxl"
    if name.startswith("LatentConsistency"):
        return "lcm"
    return "sd"


def pipeline_class_for(class_name: str) -> type["DiffusionPipeline"]:
    name = normalize_class_name(class_name)
    target = PIPELINES.get(name)
    if target is None:
        raise PackageError(f"pipeline class {class_name!r} is not supported; supported: {', '.join(sorted(PIPELINES))}")
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def pipeline_class_for_task(task: str, class_name: str) -> type["DiffusionPipeline"]:
    family = family_of(class_name)
    name = TASKS[task].get(family)
    if name is None:
        raise PackageError(f"no {task} pipeline for a {normalize_class_name(class_name)} package")
    return pipeline_class_for(name)
