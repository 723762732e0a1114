"""Text encoders of an original-layout checkpoint: CLIP (transformers layout) and OpenCLIP, mapped to transformers.

SD 1.x's CLIP ViT-L (`cond_stage_model.transformer.`, SDXL `conditioner.embedders.0.transformer.`) is already
in transformers' layout. OpenCLIP (SD 2.x `cond_stage_model.model.`, SDXL `conditioner.embedders.1.model.`,
refiner `conditioner.embedders.0.model.`) fuses q/k/v into `in_proj` and multiplies by `text_projection` from the
right. Every layer is kept: SD 2.x runs the penultimate one, which the runtime selects through `hidden_states`
(diffusers instead drops the 24th layer from its SD 2.x checkpoints). Facts from diffusers'
`convert_ldm_clip_checkpoint` / `convert_open_clip_checkpoint`.
"""
from __future__ import annotations

import re
from typing import Any

from diffrt.errors import ExportError
from diffrt.export.single_file_unet import Plan, Shapes, Take, rename_prefix

OPEN_CLIP_FIXED = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPEN_CLIP_LAYER = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}
OPEN_CLIP_IGNORED = {"logit_scale", "attn_mask"}  # contrastive-loss temperature, a constant causal mask
RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")

# transformers' CLIPTextConfig as the Hub's SD checkpoints save it. Token ids are the legacy 0/2/1 of those
# configs: with eos_token_id == 2, CLIPTextTransformer pools at argmax(input_ids), i.e. at the first <|endoftext|>.
CLIP_CONFIG_BASE: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_text_model",
    "pad_token_id": 1,
}
HEAD_DIM = 64  # CLIP ViT-L/H/bigG all use 64-wide heads


CLIP_MODULES = ("embeddings.", "encoder.", "final_layer_norm.")


def clip_plan(keys: list[str]) -> tuple[Plan, list[str]]:
    """CLIP keys under `transformer.` are transformers keys already; `position_ids` is a buffer, not a weight.

    Written as `text_model.*` (the layout of the Hub's checkpoints, which every transformers version loads); files
    saved from a bare CLIPTextTransformer lack that prefix.
    """
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        if key.endswith("embeddings.position_ids"):
            continue
        if key.startswith("text_model."):
            plan[key] = Take(key)
        elif key.startswith(CLIP_MODULES):
            plan[f"text_model.{key}"] = Take(key)
        else:
            unknown.append(key)
    return plan, unknown


def _resblock(layer: str, rest: str, key: str, plan: Plan) -> bool:
    target = f"text_model.encoder.layers.{layer}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]
        for part in ("q", "k", "v"):
            plan[f"{target}self_attn.{part}_proj.{kind}"] = Take(key, part)
        return True
    renamed = rename_prefix(rest, OPEN_CLIP_LAYER)
    if renamed is not None:
        plan[target + renamed] = Take(key)
    return renamed is not None


def open_clip_plan(keys: list[str], with_projection: bool) -> tuple[Plan, list[str]]:
    """OpenCLIP keys (under `model.`) -> transformers CLIPTextModel[WithProjection] keys."""
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        match = RESBLOCK.match(key)
        if key == "text_projection":
            if with_projection:  # SD 2.x stores one too, but its text encoder has no projection
                plan["text_projection.weight"] = Take(key, "transpose")
        elif key in OPEN_CLIP_FIXED:
            plan[OPEN_CLIP_FIXED[key]] = Take(key)
        elif match:
            if not _resblock(match.group(1), match.group(2), key, plan):
                unknown.append(key)
        elif key not in OPEN_CLIP_IGNORED:
            unknown.append(key)
    return plan, unknown


def _require(shapes: Shapes, key: str, component: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ExportError(f"single-file {component} weights are incomplete: missing `{key}`")
    return shapes[key]


def infer_clip_config(shapes: Shapes, component: str, with_projection: bool, hidden_act: str) -> dict[str, Any]:
    """CLIPTextConfig from the mapped (transformers-named) shapes; heads follow CLIP's 64-wide convention."""
    vocab, hidden = _require(shapes, "text_model.embeddings.token_embedding.weight", component)
    layers = {int(m.group(1)) for k in shapes if (m := LAYER.match(k))}
    config = {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        **CLIP_CONFIG_BASE,
        "hidden_act": hidden_act,
        "hidden_size": hidden,
        "intermediate_size": _require(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", component)[0],
        "max_position_embeddings": _require(shapes, "text_model.embeddings.position_embedding.weight", component)[0],
        "num_attention_heads": hidden // HEAD_DIM if hidden % HEAD_DIM == 0 else None,
        "num_hidden_layers": len(layers),
        "projection_dim": _require(shapes, "text_projection.weight", component)[0] if with_projection else hidden,
        "vocab_size": vocab,
    }
    return config


CLIP_STRUCTURE_KEYS = ("hidden_size", "intermediate_size", "max_position_embeddings", "projection_dim", "vocab_size")
