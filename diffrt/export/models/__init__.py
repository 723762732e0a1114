"""Export-friendly PyTorch UNet, SD3 and FLUX transformers and VAEs: they load diffusers state dicts strictly and
match diffusers' outputs.

No diffusers import anywhere here: these modules are what `diffrt.export.onnx` traces.
"""
from __future__ import annotations

from diffrt.export.models.blocks import ConfiguredModel
from diffrt.export.models.controlnet import ControlNetModel
from diffrt.export.models.flux_transformer import FluxTransformer2DModel
from diffrt.export.models.sd3_transformer import SD3Transformer2DModel
from diffrt.export.models.tiny_vae import AutoencoderTiny
from diffrt.export.models.unet import UNet2DConditionModel
from diffrt.export.models.vae import AutoencoderKL, VaeDecoderForExport, VaeEncoderForExport

__all__ = [
    "AutoencoderKL",
    "AutoencoderTiny",
    "ConfiguredModel",
    "ControlNetModel",
    "FluxTransformer2DModel",
    "SD3Transformer2DModel",
    "UNet2DConditionModel",
    "VaeDecoderForExport",
    "VaeEncoderForExport",
]
