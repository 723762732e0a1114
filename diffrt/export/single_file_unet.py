"""UNet and VAE of an original-layout (LDM / SGM) checkpoint: key mapping to diffusers names and shape inference.

Keys here have the file prefix removed (`model.diffusion_model.`, `first_stage_model.`). A mapping is a plan,
`{diffusers key: Take(original key, op)}`, computed from key names alone, so configs and plans are known before
any tensor is read. The facts follow diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from diffrt.errors import ExportError

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Take:
    """Where a diffusers tensor comes from: an original key and how to reshape it.

    op: "copy"; "linear" (a 1x1 convolution stored where diffusers has a Linear); "transpose" (OpenCLIP's
    `x @ text_projection` against a Linear's `x @ W.T`); "q", "k", "v" (one third of a fused `in_proj` / `qkv`);
    "rows" (rows `rows[0]:rows[1]` of dim 0, e.g. FLUX's single-block `linear1`, which fuses q, k, v and the MLP
    input at unequal widths); "swap" (the two halves of dim 0 exchanged: the original DiT adaLN output is
    (shift, scale), diffusers' `AdaLayerNormContinuous` reads (scale, shift)); "eye" (an identity matrix as wide as
    the key's last dim: SD3 files leave out CLIP-L's projection, which SD3 runs as the identity).
    """

    key: str
    op: str = "copy"
    rows: tuple[int, int] | None = None  # op "rows" only: [start, stop) of dim 0


Plan = dict[str, Take]
OPS = ("copy", "linear", "transpose", "q", "k", "v", "rows", "swap", "eye")


def take_shape(shape: tuple[int, ...], op: str, rows: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The shape a `Take` with `op` (and `rows`) gives a tensor of `shape`."""
    if op == "linear":
        return shape[:2]
    if op == "transpose":
        return tuple(reversed(shape))
    if op in ("q", "k", "v"):
        return (shape[0] // 3, *shape[1:])
    if op == "rows":
        assert rows is not None, "op 'rows' needs Take.rows"
        return (rows[1] - rows[0], *shape[1:])
    if op == "eye":
        return (shape[-1], shape[-1])
    return shape


def apply_take(tensor: Any, take: Take) -> Any:
    """The tensor `take` gives from the original `tensor` (shape as `take_shape`); never a view sharing storage
    with another result (safetensors refuses to save those)."""
    op = take.op
    if op == "linear":
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    if op == "transpose":
        return tensor.T.contiguous()
    if op in ("q", "k", "v"):
        return tensor.chunk(3, dim=0)["qkv".index(op)].clone()
    if op == "rows":
        assert take.rows is not None, "op 'rows' needs Take.rows"
        return tensor[take.rows[0]:take.rows[1]].clone()
    if op == "swap":
        if tensor.shape[0] % 2:
            raise ExportError(f"`{take.key}`: cannot swap the halves of an odd dim 0 ({tensor.shape[0]})")
        return tensor.roll(tensor.shape[0] // 2, dims=0)
    if op == "eye":
        return tensor.new_zeros((tensor.shape[-1], tensor.shape[-1])).fill_diagonal_(1)
    return tensor


UNET_FIXED = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
    "label_emb.0.0.": "add_embedding.linear_1.",  # SDXL's size / crop / aesthetic-score conditioning
    "label_emb.0.2.": "add_embedding.linear_2.",
}
RESNET_RENAMES = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "emb_layers.1.": "time_emb_proj.",
    "skip_connection.": "conv_shortcut.",
    "nin_shortcut.": "conv_shortcut.",  # the VAE's name for it
}
VAE_FIXED = {
    "encoder.norm_out.": "encoder.conv_norm_out.",
    "decoder.norm_out.": "decoder.conv_norm_out.",
}
VAE_ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
UNET_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
UNET_MID = re.compile(r"^middle_block\.(\d+)\.(.+)$")
VAE_LEVEL = re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)$")
VAE_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")


def rename_prefix(rest: str, table: dict[str, str]) -> str | None:
    """Replace the leading module path of `rest` using `table`; None when no entry matches."""
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def _resnet(rest: str) -> str:
    renamed = rename_prefix(rest, RESNET_RENAMES)
    return rest if renamed is None else renamed


def _mid_key(index: int, rest: str) -> str | None:
    if index == 1:
        return f"mid_block.attentions.0.{rest}"
    return f"mid_block.resnets.{index // 2}.{_resnet(rest)}" if index in (0, 2) else None


def _block_key(kind: str, index: int, slot: int, rest: str, per_level: int) -> str | None:
    """Diffusers name of `<kind>.<index>.<slot>.<rest>`; LDM numbers blocks flat, diffusers per level."""
    if kind == "input_blocks":
        if index == 0:  # conv_in, a fixed name
            return None
        level, layer = divmod(index - 1, per_level + 1)
        if layer == per_level:  # the last slot of a level is its downsampler
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        if slot == 0:
            return f"down_blocks.{level}.resnets.{layer}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{layer}.{rest}" if slot == 1 else None
    level, layer = divmod(index, per_level + 1)
    if slot == 0:
        return f"up_blocks.{level}.resnets.{layer}.{_resnet(rest)}"
    if rest.startswith("conv."):  # the upsampler: slot 1 in a level without attention, slot 2 after one
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"up_blocks.{level}.attentions.{layer}.{rest}" if slot == 1 else None


def _unet_key(key: str, per_level: int) -> str | None:
    fixed = rename_prefix(key, UNET_FIXED)
    if fixed is not None:
        return fixed
    match = UNET_MID.match(key)
    if match:
        return _mid_key(int(match.group(1)), match.group(2))
    match = UNET_BLOCK.match(key)
    if match:
        return _block_key(match.group(1), int(match.group(2)), int(match.group(3)), match.group(4), per_level)
    return None


def unet_plan(keys: list[str], per_level: int) -> tuple[Plan, list[str]]:
    """Plan for the UNet keys (prefix removed); also returns the keys it cannot place."""
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        new = _unet_key(key, per_level)
        if new is None:
            unknown.append(key)
        else:
            plan[new] = Take(key)
    return plan, unknown


def _vae_key(key: str, levels: int) -> tuple[str, str] | None:
    """(diffusers key, op) for a VAE key, or None."""
    match = VAE_LEVEL.match(key)
    if match:
        part, direction, level, module, resnet, rest = match.groups()
        index = int(level) if direction == "down" else levels - 1 - int(level)  # the decoder counts upwards
        block = f"{part}.{direction}_blocks.{index}"
        if resnet is not None:
            return f"{block}.resnets.{resnet}.{_resnet(rest)}", "copy"
        sampler = "downsamplers" if module == "downsample" else "upsamplers"
        return f"{block}.{sampler}.0.{rest}", "copy"
    match = VAE_MID.match(key)
    if match:
        part, module, rest = match.groups()
        if module == "attn_1":
            renamed = rename_prefix(rest, VAE_ATTENTION)
            op = "linear" if rest.endswith("weight") and not rest.startswith("norm.") else "copy"
            return (f"{part}.mid_block.attentions.0.{renamed}", op) if renamed else None
        return f"{part}.mid_block.resnets.{int(module[-1]) - 1}.{_resnet(rest)}", "copy"
    if re.match(r"^(encoder\.conv_(in|out)|decoder\.conv_(in|out)|quant_conv|post_quant_conv)\.", key):
        return key, "copy"
    renamed = rename_prefix(key, VAE_FIXED)
    return (renamed, "copy") if renamed else None


def vae_plan(keys: list[str], levels: int) -> tuple[Plan, list[str]]:
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        found = _vae_key(key, levels)
        if found is None:
            unknown.append(key)
        else:
            plan[found[0]] = Take(key, found[1])
    return plan, unknown


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def _require(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ExportError(f"single-file {what} weights are incomplete: missing `{key}`")
    return shapes[key]


def unet_layers_per_block(shapes: Shapes) -> int:
    """Resnets per level: the first downsampler (`input_blocks.N.0.op`) sits at N = layers_per_block + 1."""
    blocks = _indices(shapes, r"^input_blocks\.(\d+)\.")
    downsamplers = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in shapes]
    return downsamplers[0] - 1 if downsamplers else len(blocks) - 1


def _transformer_depth(shapes: Shapes, prefix: str) -> int:
    return len(_indices(shapes, rf"^{re.escape(prefix)}transformer_blocks\.(\d+)\."))


def infer_unet_structure(shapes: Shapes) -> dict[str, Any]:
    """The diffusers UNet config values that the weights determine."""
    conv_in = _require(shapes, "input_blocks.0.0.weight", "UNet")
    per = unet_layers_per_block(shapes)
    # input_blocks: conv_in, then per level `per` resnets and a downsampler (none after the last level)
    levels = len(_indices(shapes, r"^input_blocks\.(\d+)\.")) // (per + 1)
    channels, down, up, depths = [], [], [], []
    for level in range(levels):
        first = (per + 1) * level + 1
        channels.append(_require(shapes, f"input_blocks.{first}.0.out_layers.3.weight", "UNet")[0])
        depth = _transformer_depth(shapes, f"input_blocks.{first}.1.")
        down.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth or 1)
        up_attention = _transformer_depth(shapes, f"output_blocks.{(per + 1) * level}.1.")
        up.append("CrossAttnUpBlock2D" if up_attention else "UpBlock2D")
    mid_depth = _transformer_depth(shapes, "middle_block.1.")
    if mid_depth and mid_depth != depths[-1]:
        raise ExportError(f"unsupported UNet: mid-block depth {mid_depth} differs from the last level's {depths[-1]}")
    to_k = next((s for k, s in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in sorted(shapes.items()) if k.endswith(".proj_in.weight")), None)
    structure: dict[str, Any] = {
        "in_channels": conv_in[1],
        "out_channels": _require(shapes, "out.2.weight", "UNet")[0],
        "block_out_channels": channels,
        "layers_per_block": per,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": to_k[1] if to_k else None,
        "use_linear_projection": bool(proj_in and len(proj_in) == 2),
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
    }
    if "label_emb.0.0.weight" in shapes:
        structure["projection_class_embeddings_input_dim"] = shapes["label_emb.0.0.weight"][1]
    return structure


def infer_vae_structure(shapes: Shapes) -> dict[str, Any]:
    """The diffusers AutoencoderKL config values that the weights determine."""
    levels = _indices(shapes, r"^encoder\.down\.(\d+)\.")
    if not levels:
        raise ExportError("single-file VAE weights are incomplete: no `first_stage_model.encoder.down.*` keys")
    channels = [_require(shapes, f"encoder.down.{i}.block.0.conv2.weight", "VAE")[0] for i in levels]
    return {
        "in_channels": _require(shapes, "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _require(shapes, "decoder.conv_out.weight", "VAE")[0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "layers_per_block": len(_indices(shapes, r"^encoder\.down\.0\.block\.(\d+)\.")),
        "latent_channels": _require(shapes, "decoder.conv_in.weight", "VAE")[1],
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }
