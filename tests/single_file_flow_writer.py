"""Test helper: write a tiny diffusers SD3 / SD3.5 / FLUX.1 folder as the single files the community ships.

The inverse of what `diffrt.export.single_file_flow` reads, written independently of it from the original model
code's module names (Stability's `sd3_impls` MMDiT: `joint_blocks.N.{x_block,context_block}`; BFL's `flux` package:
`double_blocks` / `single_blocks`) and from what diffusers' `single_file_utils` converters undo: fused q/k/v
(and, in FLUX single blocks, the MLP input) concatenated along rows, adaLN outputs stored (shift, scale).

Layouts:
- SD3 (`sd3_medium_incl_clips_t5xxlfp16.safetensors`): `model.diffusion_model.` MMDiT, `first_stage_model.` VAE,
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` text encoders in transformers' key names;
- SD3.5 (`sd3.5_medium.safetensors`): the same without text encoders (`texts=()`);
- FLUX.1 (`flux1-dev.safetensors`): the transformer alone, top-level keys (`prefix=""`), or under
  `model.diffusion_model.` with the VAE and `text_encoders.{clip_l,t5xxl}` (ComfyUI all-in-one saves).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from single_file_writer import vae_to_original

SD3_TOP = [  # (original, diffusers) prefixes
    ("pos_embed", "pos_embed.pos_embed"), ("x_embedder.proj.", "pos_embed.proj."),
    ("t_embedder.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("y_embedder.mlp.0.", "time_text_embed.text_embedder.linear_1."),
    ("y_embedder.mlp.2.", "time_text_embed.text_embedder.linear_2."),
    ("context_embedder.", "context_embedder."), ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
]
SD3_BLOCK = [  # inside `joint_blocks.N.` / `transformer_blocks.N.`
    ("x_block.attn.ln_q.", "attn.norm_q."), ("x_block.attn.ln_k.", "attn.norm_k."),
    ("context_block.attn.ln_q.", "attn.norm_added_q."), ("context_block.attn.ln_k.", "attn.norm_added_k."),
    ("x_block.attn.proj.", "attn.to_out.0."), ("context_block.attn.proj.", "attn.to_add_out."),
    ("x_block.attn2.ln_q.", "attn2.norm_q."), ("x_block.attn2.ln_k.", "attn2.norm_k."),
    ("x_block.attn2.proj.", "attn2.to_out.0."),
    ("x_block.adaLN_modulation.1.", "norm1.linear."), ("context_block.adaLN_modulation.1.", "norm1_context.linear."),
    ("x_block.mlp.fc1.", "ff.net.0.proj."), ("x_block.mlp.fc2.", "ff.net.2."),
    ("context_block.mlp.fc1.", "ff_context.net.0.proj."), ("context_block.mlp.fc2.", "ff_context.net.2."),
]
SD3_FUSED = [  # original fused qkv <- diffusers q, k, v
    ("x_block.attn.qkv.", ("attn.to_q.", "attn.to_k.", "attn.to_v.")),
    ("context_block.attn.qkv.", ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")),
    ("x_block.attn2.qkv.", ("attn2.to_q.", "attn2.to_k.", "attn2.to_v.")),
]
FLUX_TOP = [
    ("time_in.in_layer.", "time_text_embed.timestep_embedder.linear_1."),
    ("time_in.out_layer.", "time_text_embed.timestep_embedder.linear_2."),
    ("vector_in.in_layer.", "time_text_embed.text_embedder.linear_1."),
    ("vector_in.out_layer.", "time_text_embed.text_embedder.linear_2."),
    ("guidance_in.in_layer.", "time_text_embed.guidance_embedder.linear_1."),
    ("guidance_in.out_layer.", "time_text_embed.guidance_embedder.linear_2."),
    ("txt_in.", "context_embedder."), ("img_in.", "x_embedder."), ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
]
FLUX_DOUBLE = [
    ("img_mod.lin.", "norm1.linear."), ("txt_mod.lin.", "norm1_context.linear."),
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"), ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("img_attn.proj.", "attn.to_out.0."), ("txt_attn.proj.", "attn.to_add_out."),
    ("img_mlp.0.", "ff.net.0.proj."), ("img_mlp.2.", "ff.net.2."),
    ("txt_mlp.0.", "ff_context.net.0.proj."), ("txt_mlp.2.", "ff_context.net.2."),
]
FLUX_DOUBLE_FUSED = [
    ("img_attn.qkv.", ("attn.to_q.", "attn.to_k.", "attn.to_v.")),
    ("txt_attn.qkv.", ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")),
]
FLUX_SINGLE = [
    ("modulation.lin.", "norm.linear."), ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"), ("linear2.", "proj_out."),
]
FLUX_SINGLE_FUSED = [("linear1.", ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp."))]


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(scale, shift) <-> (shift, scale)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _convert(state: dict[str, torch.Tensor], inner: str, outer: str, pairs, fused) -> dict[str, torch.Tensor]:
    """Keys under diffusers' `inner` (e.g. `transformer_blocks.3.`) renamed under `outer` by `pairs`, `fused` groups
    concatenated along rows (their diffusers parts removed from `state`)."""
    out = {}
    for original, parts in fused:
        for kind in ("weight", "bias"):
            names = [f"{inner}{p}{kind}" for p in parts]
            if all(n in state for n in names):
                out[f"{outer}{original}{kind}"] = torch.cat([state.pop(n) for n in names])
    for key in [k for k in state if k.startswith(inner)]:
        rest = key[len(inner):]
        for original, diffusers in pairs:
            if rest == diffusers or (diffusers.endswith(".") and rest.startswith(diffusers)):
                out[outer + original + rest[len(diffusers):]] = state.pop(key)
                break
    return out


def sd3_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    last = config["num_layers"] - 1
    for i in range(config["num_layers"]):
        block = _convert(state, f"transformer_blocks.{i}.", f"joint_blocks.{i}.", SD3_BLOCK, SD3_FUSED)
        if i == last:  # the pre-only text stream's adaLN is AdaLayerNormContinuous: (scale, shift) in diffusers
            for kind in ("weight", "bias"):
                key = f"joint_blocks.{i}.context_block.adaLN_modulation.1.{kind}"
                block[key] = swap_halves(block[key])
        out.update(block)
    top = _convert(state, "", "", SD3_TOP, [])
    for kind in ("weight", "bias"):
        top[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(top[f"final_layer.adaLN_modulation.1.{kind}"])
    out.update(top)
    assert not state, f"unconverted SD3 keys: {sorted(state)[:5]}"
    return out


def flux_to_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for i in range(config["num_layers"]):
        out.update(_convert(state, f"transformer_blocks.{i}.", f"double_blocks.{i}.", FLUX_DOUBLE, FLUX_DOUBLE_FUSED))
    for i in range(config["num_single_layers"]):
        out.update(_convert(state, f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", FLUX_SINGLE,
                            FLUX_SINGLE_FUSED))
    top = _convert(state, "", "", FLUX_TOP, [])
    for kind in ("weight", "bias"):
        top[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(top[f"final_layer.adaLN_modulation.1.{kind}"])
    out.update(top)
    assert not state, f"unconverted FLUX keys: {sorted(state)[:5]}"
    return out


def text_to_original(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """transformers CLIP (keys `text_model.*`, flat in transformers >= 5.6) / T5 encoder keys as the files hold them."""
    if kind == "t5":
        return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    weights = next((folder / name).glob("*.safetensors"))
    return load_file(weights), json.loads((folder / name / "config.json").read_text())


SD3_TEXTS = {"clip_l": ("text_encoder", "clip"), "clip_g": ("text_encoder_2", "clip"),
             "t5xxl": ("text_encoder_3", "t5")}
FLUX_TEXTS = {"clip_l": ("text_encoder", "clip"), "t5xxl": ("text_encoder_2", "t5")}


def write_flow_single_file(folder: Path, family: str, out: Path, *, prefix: str = "model.diffusion_model.",
                           vae: bool = True, texts: tuple[str, ...] = (), dtype: torch.dtype | None = None,
                           drop: tuple[str, ...] = ()) -> Path:
    """Write the tiny diffusers `folder` (family "sd3" or "flux") as one original-layout file: the transformer
    under `prefix`, the VAE under `first_stage_model.` when `vae`, the named `texts` (clip_l, clip_g, t5xxl) under
    `text_encoders.<name>.transformer.`; keys in `drop` (full names) left out; tensors cast to `dtype`."""
    weights, config = _component(folder, "transformer")
    convert = sd3_to_original if family == "sd3" else flux_to_original
    state = {prefix + k: v for k, v in convert(weights, config).items()}
    if vae:
        state.update({f"first_stage_model.{k}": v for k, v in vae_to_original(*_component(folder, "vae")).items()})
    table = SD3_TEXTS if family == "sd3" else FLUX_TEXTS
    for name in texts:
        component, kind = table[name]
        converted = text_to_original(_component(folder, component)[0], kind)
        state.update({f"text_encoders.{name}.transformer.{k}": v for k, v in converted.items()})
    state = {k: v.to(dtype) if dtype is not None else v for k, v in state.items() if k not in drop}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
