"""FLUX.1 transformer of a Black Forest Labs-layout checkpoint -> FluxTransformer2DModel.

`flux1-dev.safetensors` / `flux1-schnell.safetensors` hold the transformer alone, keys at the top level or under
`model.diffusion_model.` (ComfyUI saves). Dual-stream `double_blocks.N` fuse q/k/v in `img_attn.qkv` /
`txt_attn.qkv` and keep the RMS qk-norm scales as `norm.query_norm.scale`; single-stream `single_blocks.N` fuse
q, k, v and the MLP input into one `linear1` (3 x hidden + 4 x hidden rows) and the attention output with the MLP
output into `linear2`. `final_layer.adaLN_modulation.1` is (shift, scale), diffusers' `norm_out` (scale, shift).
`guidance_in` is FLUX.1-dev's guidance embedding (schnell has none). Facts from diffusers'
`convert_flux_transformer_checkpoint_to_diffusers` (whose hard-coded 3072 width is read from the shapes here).
"""
from __future__ import annotations

import re
from typing import Any

from diffrt.errors import ExportError
from diffrt.export.single_file_unet import Plan, Shapes, Take, rename_prefix

DETECT_KEY = "double_blocks.0.img_attn.qkv.weight"
MLP_RATIO = 4  # FluxSingleTransformerBlock's, not a config value
# FLUX.1's rotary axes (time, height, width) for 128-wide heads; other widths need a config folder
AXES_DIMS_ROPE = {128: [16, 56, 56]}
FIXED = {
    "time_in.in_layer.": "time_text_embed.timestep_embedder.linear_1.",
    "time_in.out_layer.": "time_text_embed.timestep_embedder.linear_2.",
    "vector_in.in_layer.": "time_text_embed.text_embedder.linear_1.",
    "vector_in.out_layer.": "time_text_embed.text_embedder.linear_2.",
    "guidance_in.in_layer.": "time_text_embed.guidance_embedder.linear_1.",
    "guidance_in.out_layer.": "time_text_embed.guidance_embedder.linear_2.",
    "txt_in.": "context_embedder.",
    "img_in.": "x_embedder.",
    "final_layer.linear.": "proj_out.",
}
DOUBLE: dict[str, str | tuple[str, str, str]] = {
    "img_mod.lin.": "norm1.linear.",
    "txt_mod.lin.": "norm1_context.linear.",
    "img_attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "txt_attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj.": "attn.to_out.0.",
    "txt_attn.proj.": "attn.to_add_out.",
    "img_mlp.0.": "ff.net.0.proj.",
    "img_mlp.2.": "ff.net.2.",
    "txt_mlp.0.": "ff_context.net.0.proj.",
    "txt_mlp.2.": "ff_context.net.2.",
}
SINGLE = {
    "modulation.lin.": "norm.linear.",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2.": "proj_out.",
}
# linear1's rows in order: q, k, v (hidden each), then the MLP input (MLP_RATIO x hidden)
LINEAR1_PARTS = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")
DOUBLE_BLOCK = re.compile(r"^double_blocks\.(\d+)\.(.+)$")
SINGLE_BLOCK = re.compile(r"^single_blocks\.(\d+)\.(.+)$")


def _rename(rest: str, table: dict[str, Any]) -> tuple[str, Any] | None:
    for original, target in table.items():
        if rest == original or (original.endswith(".") and rest.startswith(original)):
            return rest[len(original):], target
    return None


def flux_transformer_plan(keys: list[str], hidden: int) -> tuple[Plan, list[str]]:
    """Plan for the transformer keys (prefix removed), `hidden` the model width (`img_in` rows); also returns the
    keys it cannot place."""
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        double, single = DOUBLE_BLOCK.match(key), SINGLE_BLOCK.match(key)
        if double:
            found = _rename(double.group(2), DOUBLE)
            if found is None:
                unknown.append(key)
                continue
            tail, target = found
            prefix = f"transformer_blocks.{double.group(1)}."
            if isinstance(target, tuple):
                for part, name in zip("qkv", target):
                    plan[prefix + name + tail] = Take(key, part)
            else:
                plan[prefix + target + tail] = Take(key)
        elif single:
            prefix, rest = f"single_transformer_blocks.{single.group(1)}.", single.group(2)
            if rest.startswith("linear1."):
                tail = rest[len("linear1."):]
                bounds = (0, hidden, 2 * hidden, 3 * hidden, (3 + MLP_RATIO) * hidden)
                for index, name in enumerate(LINEAR1_PARTS):
                    plan[prefix + name + tail] = Take(key, "rows", (bounds[index], bounds[index + 1]))
            elif (found := _rename(rest, SINGLE)) is not None:
                plan[prefix + found[1] + found[0]] = Take(key)
            else:
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
        raise ExportError(f"single-file FLUX transformer weights are incomplete: missing `{key}`")
    return shapes[key]


def flux_hidden(shapes: Shapes) -> int:
    return _require(shapes, "img_in.weight")[0]


def infer_flux_transformer(shapes: Shapes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(structure, conventions): the FluxTransformer2DModel config values the weights determine, and the rotary
    axes they do not."""
    hidden, in_channels = _require(shapes, "img_in.weight")
    head_dim = _require(shapes, "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    doubles = {int(m.group(1)) for k in shapes if (m := DOUBLE_BLOCK.match(k))}
    singles = sorted({int(m.group(1)) for k in shapes if (m := SINGLE_BLOCK.match(k))})
    if singles:
        rows = _require(shapes, f"single_blocks.{singles[0]}.linear1.weight")[0]
        if rows != (3 + MLP_RATIO) * hidden:
            raise ExportError(f"unsupported FLUX transformer: single-block `linear1` has {rows} rows, not "
                              f"{3 + MLP_RATIO} x {hidden} (q, k, v and an MLP of ratio {MLP_RATIO})")
    out = _require(shapes, "final_layer.linear.weight")[0]
    structure: dict[str, Any] = {
        "patch_size": 1,  # FLUX.1 packs 2x2 latent patches outside the transformer
        "in_channels": in_channels,
        "out_channels": None if out == in_channels else out,  # FLUX.1 Fill / Depth read more than they predict
        "num_layers": len(doubles),
        "num_single_layers": len(singles),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": _require(shapes, "txt_in.weight")[1],
        "pooled_projection_dim": _require(shapes, "vector_in.in_layer.weight")[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }
    return structure, {"axes_dims_rope": AXES_DIMS_ROPE.get(head_dim)}
