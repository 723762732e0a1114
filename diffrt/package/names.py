"""The names of the model package format (docs/package-format.md): files, folders, components, format versions.

Every module that reads or writes a package takes these from here, so each name is spelled once.
"""
from __future__ import annotations

from pathlib import Path

FORMAT_NAME = "diffrt-package"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST_NAME = "diffrt.json"
INDEX_NAME = "model_index.json"
CONFIG_NAME = "config.json"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_NAME = "model.onnx_data"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# SD3 adds a third text encoder (T5); SD3 and FLUX denoise with a `transformer` instead of a `unet`.
ONNX_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_encoder",
                   "vae_decoder")
TINY_VAE_COMPONENTS = ("vae_decoder_tiny", "vae_encoder_tiny")
#: components a pipeline runs once per image (a text encoder once per prompt chunk), not at every step
RUN_ONCE_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae_encoder", "vae_decoder",
                       *TINY_VAE_COMPONENTS)
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# model_index.json entry of an ONNX component, as Optimum and Diffusers' ONNX pipelines write it
ONNX_ENTRY = ("diffusers", "OnnxRuntimeModel")
# Optimum's ORT pipelines and Diffusers' legacy ONNX pipelines read the same folders as the Diffusers class.
CLASS_PREFIXES = ("ORT", "Onnx")
# TensorRT plans and their build records: <component>/engines/<key>.plan + <key>.json
ENGINES_FOLDER = "engines"
# ControlNets: component `controlnet_<name>`, and the residual tensors they hand the UNet (docs/package-format.md).
# A ControlNet's outputs and the UNet's residual inputs are listed in the same order: skip connections, then mid.
CONTROLNET_PREFIX = "controlnet_"
CONTROLNET_DOWN_OUTPUT = "down_block_res_sample_{}"
CONTROLNET_MID_OUTPUT = "mid_block_res_sample"
UNET_DOWN_RESIDUAL = "down_block_additional_residual_{}"
UNET_MID_RESIDUAL = "mid_block_additional_residual"
# DeepCache (docs/package-format.md): the UNet's extra output, the partial UNet that takes it in its place, and the
# manifest's top-level record `{"deep_cache": {"branch": N}}` that says a package has both.
DEEP_CACHE_KEY = "deep_cache"
DEEP_CACHE_FEATURE = "deep_cache_feature"
UNET_SHALLOW = "unet_shallow"
