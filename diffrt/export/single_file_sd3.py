"""SD3 / SD3.5 MMDiT transformer of an original-layout (Stability `sd3_impls`) checkpoint -> SD3Transformer2DModel.

Keys have the file prefix (`model.diffusion_model.`) removed. Each `joint_blocks.N` pairs an image stream
(`x_block`) with a text stream (`context_block`); q/k/v are fused in `attn.qkv`; SD3.5's RMS qk-norm is
`attn.ln_q` / `attn.ln_k`, its MMDiT-X blocks add a second image-only attention `x_block.attn2`. The last block's
text stream is "pre-only" (no output projection, no MLP) and, like `final_layer`, its adaLN output is
(shift, scale) where diffusers' `AdaLayerNormContinuous` reads (scale, shift). Facts from diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`; the config values follow from the shapes.
"""
from __future__ import annotations

import math
import re
from typing import Any

from diffrt.errors import ExportError
from diffrt.export.single_file_unet import Plan, Shapes, Take, rename_prefix

DETECT_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
HEAD_DIM = 64  # every published SD3 / SD3.5 transformer; files with qk-norm say it through `ln_q`
SAMPLE_SIZE = 128  # 1024 px over the VAE's factor 8
FIXED = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
    "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
    "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
    "context_embedder.": "context_embedder.",
    "final_layer.linear.": "proj_out.",
}
# per stream: original sub-path -> diffusers sub-path of `transformer_blocks.N.`; a tuple is a fused q/k/v
STREAMS: dict[str, dict[str, str | tuple[str, str, str]]] = {
    "x_block": {
        "attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
        "attn.ln_q.": "attn.norm_q.",
        "attn.ln_k.": "attn.norm_k.",
        "attn.proj.": "attn.to_out.0.",
        "attn2.qkv.": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."),
        "attn2.ln_q.": "attn2.norm_q.",
        "attn2.ln_k.": "attn2.norm_k.",
        "attn2.proj.": "attn2.to_out.0.",
        "adaLN_modulation.1.": "norm1.linear.",
        "mlp.fc1.": "ff.net.0.proj.",
        "mlp.fc2.": "ff.net.2.",
    },
    "context_block": {
        "attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
        "attn.ln_q.": "attn.norm_added_q.",
        "attn.ln_k.": "attn.norm_added_k.",
        "attn.proj.": "attn.to_add_out.",
        "adaLN_modulation.1.": "norm1_context.linear.",
        "mlp.fc1.": "ff_context.net.0.proj.",
        "mlp.fc2.": "ff_context.net.2.",
    },
}
BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)$")


def _pre_only(keys: set[str], block: str) -> bool:
    """The text stream of the last block only conditions the attention: no output projection."""
    return f"joint_blocks.{block}.context_block.attn.proj.weight" not in keys


def _block_take(block: str, stream: str, rest: str, key: str, keys: set[str], plan: Plan) -> bool:
    for original, target in STREAMS[stream].items():
        if not rest.startswith(original):
            continue
        tail = rest[len(original):]
        prefix = f"transformer_blocks.{block}."
        if isinstance(target, tuple):
            for part, name in zip("qkv", target):
                plan[prefix + name + tail] = Take(key, part)
        else:
            swap = stream == "context_block" and original == "adaLN_modulation.1." and _pre_only(keys, block)
            plan[prefix + target + tail] = Take(key, "swap" if swap else "copy")
        return True
    return False


def sd3_transformer_plan(keys: list[str]) -> tuple[Plan, list[str]]:
    """Plan for the transformer keys (prefix removed); also returns the keys it cannot place."""
    plan: Plan = {}
    unknown: list[str] = []
    present = set(keys)
    for key in keys:
        match = BLOCK.match(key)
        if match:
            if not _block_take(match.group(1), match.group(2), match.group(3), key, present, plan):
                unknown.append(key)
        elif key.startswith("final_layer.adaLN_modulation.1."):
            plan["norm_out.linear." + key.rsplit(".", 1)[1]] = Take(key, "swap")
        elif (renamed := rename_prefix(key, FIXED)) is not None:
            plan[renamed] = Take(key)
        else:
            unknown.append(key)
    return plan, unknown


def _require(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ExportError(f"single-file SD3 transformer weights are incomplete: missing `model.diffusion_model.{key}`")
    return shapes[key]


def infer_sd3_transformer(shapes: Shapes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(structure, conventions): the SD3Transformer2DModel config values the weights determine, and those they
    do not (head width without qk-norm, sample size), which a config folder may set otherwise."""
    hidden, in_channels, patch, _ = _require(shapes, "x_embedder.proj.weight")
    positions = _require(shapes, "pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ExportError(f"unsupported SD3 transformer: {positions} positions in `pos_embed` is not a square grid")
    caption_dim, joint_dim = _require(shapes, "context_embedder.weight")
    blocks = sorted({int(m.group(1)) for k in shapes if (m := BLOCK.match(k))})
    ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
    structure: dict[str, Any] = {
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": _require(shapes, "final_layer.linear.weight")[0] // (patch * patch),
        "num_layers": len(blocks),
        "joint_attention_dim": joint_dim,
        "caption_projection_dim": caption_dim,
        "pooled_projection_dim": _require(shapes, "y_embedder.mlp.0.weight")[1],
        "pos_embed_max_size": side,
        "dual_attention_layers": [b for b in blocks if f"joint_blocks.{b}.x_block.attn2.qkv.weight" in shapes],
        "qk_norm": None if ln_q is None else (
            "layer_norm" if "joint_blocks.0.x_block.attn.ln_q.bias" in shapes else "rms_norm"),
    }
    head_dim = ln_q[0] if ln_q is not None else (HEAD_DIM if hidden % HEAD_DIM == 0 else None)
    heads = hidden // head_dim if head_dim else None
    if ln_q is not None:
        structure.update(attention_head_dim=head_dim, num_attention_heads=heads)
        conventions: dict[str, Any] = {}
    else:
        conventions = {"attention_head_dim": head_dim, "num_attention_heads": heads}
    conventions["sample_size"] = SAMPLE_SIZE
    return structure, conventions


SD3_TRANSFORMER_BASE: dict[str, Any] = {"_class_name": "SD3Transformer2DModel"}
