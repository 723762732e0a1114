"""LoRA and textual-inversion files built for real with PEFT / Diffusers on the tiny checkpoints (no downloads).

`peft_lora` trains nothing: it injects a PEFT LoRA with random (non-zero) A and B into the checkpoint's UNet and
text encoder(s) and saves it with Diffusers' own `save_lora_weights` (PEFT keys + adapter metadata, as Diffusers'
training scripts write them). `kohya_lora` rewrites such a file in kohya / AUTOMATIC1111's key naming
(`lora_unet_...`, `lora_te_` / `lora_te1_` / `lora_te2_`, `.lora_down` / `.lora_up` / `.alpha`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_CONV_TARGETS = ["conv1", "conv2"]  # LoCon: 3x3 convolutions of the resnets
# LCM-LoRA's modules (Diffusers' train_lcm_distill_lora_* scripts): attention, feed-forward, proj_in / proj_out, and
# every resnet convolution, shortcut and time projection, and the down / up samplers' convolutions
LCM_LORA_TARGETS = UNET_TARGETS + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                                   "upsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _pipeline_class(kind: str):
    import diffusers

    return diffusers.StableDiffusionXLPipeline if kind.startswith("sdxl") else diffusers.StableDiffusionPipeline


def peft_lora(checkpoint: Path, kind: str, out: Path, seed: int, rank: int = 4, alpha: float = 8.0,
              text_encoders: bool = True, conv: bool = False, unet_targets: list[str] | None = None) -> Path:
    """A Diffusers-format LoRA file for `checkpoint` (PEFT keys, lora_alpha in its metadata); returns its path."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    layers, metadata = {}, {}
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                        target_modules=unet_targets or UNET_TARGETS + (UNET_CONV_TARGETS if conv else []))
    inject_adapter_in_model(config, unet)
    layers["unet_lora_layers"] = get_peft_model_state_dict(unet)
    metadata["unet_lora_adapter_metadata"] = config.to_dict()
    if text_encoders:
        names = ["text_encoder", "text_encoder_2"] if kind.startswith("sdxl") else ["text_encoder"]
        for name in names:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            encoder = cls.from_pretrained(checkpoint / name)
            config = LoraConfig(r=rank, lora_alpha=alpha / 2, init_lora_weights=False, target_modules=TEXT_TARGETS)
            inject_adapter_in_model(config, encoder)
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(encoder)
            metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    _pipeline_class(kind).save_lora_weights(out, **layers, **metadata)
    return out / "pytorch_lora_weights.safetensors"


def to_sgm(module: str, layers_per_block: int) -> str:
    """A Diffusers UNet module path in the original (SGM) UNet's names, as kohya's SDXL trainer writes them."""
    import re

    stride = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    match = re.match(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions)\.(\d+)\.(.+)$", module)
    assert match, module
    kind, level, role, index, rest = match.groups()
    inner = "0" if role == "resnets" else "1"
    rest = resnet.get(rest, rest) if role == "resnets" else rest
    if kind == "mid_block":
        position = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(role, index)]
        return f"middle_block.{position}.{rest}"
    if kind == "down_blocks":
        return f"input_blocks.{int(level) * stride + int(index) + 1}.{inner}.{rest}"
    return f"output_blocks.{int(level) * stride + int(index)}.{inner}.{rest}"


def kohya_lora(peft_file: Path, kind: str, out: Path, sgm_layers_per_block: int | None = None) -> Path:
    """The same LoRA in kohya / A1111 naming (alpha per module, as kohya's trainer writes it); with
    `sgm_layers_per_block`, UNet modules in the original SGM names (kohya's SDXL files)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(peft_file), "np") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    te_prefixes = {"text_encoder": "lora_te1_" if kind.startswith("sdxl") else "lora_te_",
                   "text_encoder_2": "lora_te2_"}
    written = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, _, role = rest.rpartition(".lora_")
        if component == "unet":
            module = to_sgm(module, sgm_layers_per_block) if sgm_layers_per_block is not None else module
            name = "lora_unet_" + module.replace(".", "_")
        else:
            if not module.startswith("text_model."):
                module = "text_model." + module
            name = te_prefixes[component] + module.replace(".", "_")
        written[f"{name}.lora_down.weight" if role.startswith("A") else f"{name}.lora_up.weight"] = value
        written[f"{name}.alpha"] = np.asarray(config[f"{component}.lora_alpha"], dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(written, str(out), metadata={"ss_network_module": "networks.lora"})
    return out


def lcm_lora(checkpoint: Path, kind: str, folder: Path, seed: int = 7) -> Path:
    """A file in LCM-LoRA's layout (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl) with random weights: UNet only,
    kohya keys in Diffusers' module names for SD 1.5 and SDXL alike (`lora_unet_down_blocks_0_resnets_0_conv1`, as
    the training scripts' `get_module_kohya_state_dict` writes them), `.lora_down` / `.lora_up` / `.alpha`."""
    peft = peft_lora(checkpoint, kind, folder, seed, text_encoders=False, unet_targets=LCM_LORA_TARGETS)
    return kohya_lora(peft, kind, folder / "lcm-lora.safetensors")
