"""Test helper: write a tiny diffusers folder as one original-layout (Stability / LDM / SGM) `.safetensors` file.

This is the inverse of what `diffrt.export.single_file` reads, written independently of it: it follows the
semantics of diffusers' published `scripts/convert_diffusers_to_original_stable_diffusion.py` and
`convert_diffusers_to_original_sdxl.py` (prefix-pair tables applied by substring replacement), generalised from
the hard-coded SD 1.x block counts to any `block_out_channels` / `layers_per_block`, so tiny checkpoints convert.
Extra keys that real files carry and a reader must ignore (DDPM buffers, CLIP `position_ids`, OpenCLIP
`logit_scale`, SD 2.x's unused `text_projection`) are written too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# Which text encoder goes where, per fixture kind: (component, original prefix, layout).
TEXT_LAYOUTS: dict[str, list[tuple[str, str, str]]] = {
    "sd15": [("text_encoder", "cond_stage_model.transformer.", "clip")],
    "sd_inpaint": [("text_encoder", "cond_stage_model.transformer.", "clip")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "open_clip")],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
        ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip"),
    ],
    "sdxl_refiner": [("text_encoder_2", "conditioner.embedders.0.model.", "open_clip")],
}

RESNET_PAIRS = [  # (original, diffusers), applied to keys inside `resnets`
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut"),
]
UNET_TOP_PAIRS = [
    ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
]
VAE_PAIRS = [
    ("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0."),
]
VAE_ATTN_PAIRS = [
    ("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0."),
]
OPEN_CLIP_PAIRS = [  # (original, transformers), applied in this order
    ("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"),
    ("ln_final.", "text_model.final_layer_norm."),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
]


def _unet_layer_pairs(config: dict) -> list[tuple[str, str]]:
    """The script's `unet_conversion_map_layer`, for any number of levels and resnets per level."""
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = []
    for i in range(levels):
        down_attn = "CrossAttn" in config["down_block_types"][i]
        up_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(per):
            pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):
            pairs.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            pairs.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            slot = 2 if up_attn else 1  # the upsampler follows the level's last resnet (and attention)
            pairs.append((f"output_blocks.{(per + 1) * i + per}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def _replace_all(key: str, pairs: list[tuple[str, str]]) -> str:
    for original, diffusers in pairs:
        key = key.replace(diffusers, original)
    return key


def unet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    layer_pairs = _unet_layer_pairs(config)
    out = {}
    for key, value in state.items():
        new = _replace_all(key, UNET_TOP_PAIRS)
        if "resnets" in new:
            new = _replace_all(new, RESNET_PAIRS)
        out[_replace_all(new, layer_pairs)] = value
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    levels, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = []
    for i in range(levels):
        pairs += [(f"down.{i}.block.{j}.", f"down_blocks.{i}.resnets.{j}.") for j in range(per)]
        pairs += [(f"up.{levels - 1 - i}.block.{j}.", f"up_blocks.{i}.resnets.{j}.") for j in range(per + 1)]
        if i < levels - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{levels - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    out = {}
    for key, value in state.items():
        new = _replace_all(_replace_all(key, VAE_PAIRS), pairs)
        if "attn_1" in new:
            new = _replace_all(new, VAE_ATTN_PAIRS)
            if value.ndim == 2:  # the original attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys (flat in transformers >= 5.6, `text_model.` before) -> LDM `transformer.`."""
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out["text_model.embeddings.position_ids"] = torch.arange(positions)[None]  # real SD 1.x files carry it
    return out


def open_clip_to_original(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers CLIP -> OpenCLIP: q/k/v fused into `in_proj`, projection stored as x @ text_projection."""
    state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif "_proj." in key and ".self_attn." in key and "out_proj" not in key:
            continue  # fused below
        else:
            out[_replace_all(key, OPEN_CLIP_PAIRS)] = value
    for key in [k for k in state if ".self_attn.q_proj." in k]:
        fused = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
        layer = _replace_all(key.split(".self_attn.")[0], OPEN_CLIP_PAIRS)
        out[f"{layer}.attn.in_proj_{key.rsplit('.', 1)[1]}"] = fused
    if "text_projection" not in out:  # SD 2.x files carry a projection its text encoder never uses
        width = out["token_embedding.weight"].shape[1]
        out["text_projection"] = torch.randn(width, width, generator=torch.Generator().manual_seed(seed))
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def _ddpm_buffers(scheduler_config: dict) -> dict[str, torch.Tensor]:
    steps = scheduler_config["num_train_timesteps"]
    betas = np.linspace(scheduler_config["beta_start"] ** 0.5, scheduler_config["beta_end"] ** 0.5, steps) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    return {"betas": torch.from_numpy(betas).float(), "alphas_cumprod": torch.from_numpy(alphas_cumprod).float()}


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    weights = next((folder / name).glob("*.safetensors"))
    return load_file(weights), json.loads((folder / name / "config.json").read_text())


def to_original(kind: str, components: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> dict[str, torch.Tensor]:
    """Original-layout state dict from diffusers components `{name: (state dict, config)}` of fixture kind `kind`.

    Works on meta tensors too, so real-size architectures can be laid out without their memory.
    """
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_original(*components["unet"]).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_original(*components["vae"]).items()})
    for component, prefix, layout in TEXT_LAYOUTS[kind]:
        weights = components[component][0]
        converted = clip_to_original(weights) if layout == "clip" else open_clip_to_original(weights)
        state.update({prefix + k: v for k, v in converted.items()})
    return state


def write_single_file(folder: Path, kind: str, out: Path) -> Path:
    """Write the diffusers folder `folder` (fixture kind `kind`) to `out` in the original single-file layout."""
    names = ["unet", "vae"] + [component for component, _, _ in TEXT_LAYOUTS[kind]]
    state = to_original(kind, {name: _component(folder, name) for name in names})
    if not kind.startswith("sdxl"):  # LDM (not SGM) checkpoints keep the DDPM schedule buffers
        state.update(_ddpm_buffers(json.loads((folder / "scheduler" / "scheduler_config.json").read_text())))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def controlnet_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel state dict in lllyasviel's layout (`control_model.` prefix): the UNet encoder's
    keys as `unet_to_original` writes them, plus `input_hint_block.N` (convs at even indices, SiLU between),
    `zero_convs.N.0` and `middle_block_out.0`."""
    unet_config = {**config, "up_block_types": ["UpBlock2D"] * len(config["block_out_channels"])}
    hint_convs = 2 + 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    out = {}
    for key, value in state.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            part, _, tail = rest.partition(".")
            if part == "conv_in":
                new = f"input_hint_block.0.{tail}"
            elif part == "conv_out":
                new = f"input_hint_block.{2 * (hint_convs - 1)}.{tail}"
            else:
                index, _, tail = tail.partition(".")
                new = f"input_hint_block.{2 * (int(index) + 1)}.{tail}"
        elif key.startswith("controlnet_down_blocks."):
            index, _, tail = key[len("controlnet_down_blocks."):].partition(".")
            new = f"zero_convs.{index}.0.{tail}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key[len("controlnet_mid_block."):]
        else:
            new = next(iter(unet_to_original({key: value}, unet_config)))
        out["control_model." + new] = value
    return out
