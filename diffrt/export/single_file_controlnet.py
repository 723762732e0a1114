"""An original-layout ControlNet file (lllyasviel's `control_v11p_sd15_openpose.safetensors` and the like) as a
diffusers ControlNetModel folder.

The keys are the LDM UNet encoder's (`input_blocks`, `middle_block`, `time_embed`, SDXL `label_emb`; mapped by
`single_file_unet`), optionally under `control_model.`, plus what ControlNet adds: `input_hint_block.N` (the
conditioning embedding: conv_in, the blocks, conv_out), `zero_convs.N.0` and `middle_block_out.0`. What the weights
cannot say (attention heads, upcast, the SDXL conditioning widths) is the base UNet's: a ControlNet is trained for
one base model, whose UNet config is given. The folder is written once per file and base config, in the diffrt
cache ($DIFFRT_CACHE or ~/.cache/diffrt), like converted single-file checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from diffrt.errors import ExportError, InputError
from diffrt.export.single_file_unet import (
    Shapes,
    _indices,
    _require,
    _transformer_depth,
    _unet_key,
    rename_prefix,
    unet_layers_per_block,
)
from diffrt.package.files import AtomicFolder, files_sha256, write_json

logger = logging.getLogger(__name__)

PREFIX = "control_model."
CONTROLNET_FIXED = {"middle_block_out.0.": "controlnet_mid_block."}
ZERO_CONV = re.compile(r"^zero_convs\.(\d+)\.0\.(.+)$")
HINT = re.compile(r"^input_hint_block\.(\d+)\.(.+)$")
# Base UNet config keys a ControlNet config takes over (those the weights do not determine)
FROM_UNET = ("attention_head_dim", "num_attention_heads", "upcast_attention", "only_cross_attention",
             "addition_embed_type", "addition_time_embed_dim", "flip_sin_to_cos", "freq_shift", "norm_num_groups",
             "norm_eps", "act_fn", "downsample_padding", "mid_block_scale_factor", "resnet_time_scale_shift",
             "mid_block_type")


def _hint_key(index: int, rest: str, last: int) -> str:
    """input_hint_block: conv(0), SiLU, conv(2), SiLU, ... conv(last); diffusers: conv_in, blocks.k, conv_out."""
    if index == 0:
        return f"controlnet_cond_embedding.conv_in.{rest}"
    if index == last:
        return f"controlnet_cond_embedding.conv_out.{rest}"
    return f"controlnet_cond_embedding.blocks.{index // 2 - 1}.{rest}"


def controlnet_keys(shapes: Shapes) -> dict[str, str]:
    """Original key (prefix removed) -> diffusers key; ExportError naming the keys it cannot place."""
    per_level = unet_layers_per_block(shapes)
    last = max(_indices(shapes, r"^input_hint_block\.(\d+)\."), default=0)
    renamed, unknown = {}, []
    for key in shapes:
        fixed = rename_prefix(key, CONTROLNET_FIXED)
        zero, hint = ZERO_CONV.match(key), HINT.match(key)
        if fixed is not None:
            new: str | None = fixed
        elif zero:
            new = f"controlnet_down_blocks.{zero.group(1)}.{zero.group(2)}"
        elif hint:
            new = _hint_key(int(hint.group(1)), hint.group(2), last)
        else:
            new = _unet_key(key, per_level)
        if new is None:
            unknown.append(key)
        else:
            renamed[key] = new
    if unknown:
        raise ExportError(f"not an original-layout ControlNet file: cannot place {len(unknown)} key(s), e.g. "
                          f"{', '.join(sorted(unknown)[:3])}")
    return renamed


def controlnet_config(shapes: Shapes, unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers ControlNetModel config: structure from the weights, the rest from the base UNet's config."""
    conv_in = _require(shapes, "input_blocks.0.0.weight", "ControlNet")
    per = unet_layers_per_block(shapes)
    levels = len(_indices(shapes, r"^input_blocks\.(\d+)\.")) // (per + 1)
    channels, down, depths = [], [], []
    for level in range(levels):
        first = (per + 1) * level + 1
        channels.append(_require(shapes, f"input_blocks.{first}.0.out_layers.3.weight", "ControlNet")[0])
        depth = _transformer_depth(shapes, f"input_blocks.{first}.1.")
        down.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth or 1)
    hints = _indices(shapes, r"^input_hint_block\.(\d+)\.weight$")
    hint_channels = [_require(shapes, f"input_hint_block.{i}.weight", "ControlNet")[0] for i in hints[:-1]]
    # conditioning_embedding_out_channels: conv_in's width, then each stride-2 block's (every other conv)
    embedding = [hint_channels[0], *hint_channels[2::2]]
    to_k = next((s for k, s in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in sorted(shapes.items()) if k.endswith(".proj_in.weight")), None)
    config: dict[str, Any] = {"_class_name": "ControlNetModel"}
    config.update({key: unet_config[key] for key in FROM_UNET if key in unet_config})
    config.update({
        "in_channels": conv_in[1],
        "conditioning_channels": _require(shapes, "input_hint_block.0.weight", "ControlNet")[1],
        "block_out_channels": channels, "layers_per_block": per, "down_block_types": down,
        "cross_attention_dim": to_k[1] if to_k else unet_config.get("cross_attention_dim"),
        "use_linear_projection": bool(proj_in and len(proj_in) == 2),
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "conditioning_embedding_out_channels": embedding,
    })
    if "label_emb.0.0.weight" in shapes:
        config["projection_class_embeddings_input_dim"] = shapes["label_emb.0.0.weight"][1]
    return config


def materialize_controlnet(file: Path, unet_config: Mapping[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The diffusers folder (config.json + diffusion_pytorch_model.safetensors) of the original-layout `file`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if unet_config is None or not unet_config:
        raise InputError("`controlnet`: a single-file ControlNet needs its base model's UNet config (export it with "
                         "the checkpoint, or into a package)")
    key = hashlib.sha256((files_sha256([file]) + json.dumps(dict(unet_config), sort_keys=True)).encode())
    root = Path(cache_dir or os.environ.get("DIFFRT_CACHE", "~/.cache/diffrt")).expanduser() / "controlnet"
    target = root / f"{file.stem}-{key.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    with safe_open(str(file), framework="pt") as handle:
        originals = list(handle.keys())
        prefixed = all(name.startswith(PREFIX) for name in originals)
        strip = len(PREFIX) if prefixed else 0
        shapes = {name[strip:]: tuple(handle.get_slice(name).get_shape()) for name in originals}
        renamed = controlnet_keys(shapes)
        config = controlnet_config(shapes, unet_config)
        tensors = {renamed[name[strip:]]: handle.get_tensor(name).contiguous() for name in originals}
    root.mkdir(parents=True, exist_ok=True)
    with AtomicFolder(target) as folder:
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
        write_json(folder / "config.json", config)
    logger.info("converted the single-file ControlNet %s into %s", file, target)
    return target
