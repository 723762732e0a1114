"""The `transformer` component of SD3 / SD3.5 (MMDiT) and FLUX.1 packages, with Optimum's IO names.

SD3: `hidden_states` [batch, C, height, width] latents, `encoder_hidden_states` [batch, sequence, joint dim] (the
77 CLIP tokens followed by the T5 tokens), `pooled_projections` [batch, pooled], `timestep` [batch] on the
0..1000 scale -> `out_hidden_states` like `hidden_states`.

FLUX: `hidden_states` [batch, image_sequence, 64] packed 2x2 latent patches, `encoder_hidden_states` [batch,
text_sequence, 4096] T5 tokens, `pooled_projections` [batch, 768] CLIP pooled, `timestep` [batch] on 0..1 (the
model scales it by 1000), `img_ids` [image_sequence, 3] / `txt_ids` [text_sequence, 3] rotary positions, and for
guidance-distilled models (FLUX.1-dev) `guidance` [batch] -> `out_hidden_states` [batch, image_sequence, 64].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffrt.errors import ConfigError, invalid
from diffrt.export.onnx import BATCH_RANGE, LATENT_RANGE, TEXT_LENGTH, ComponentGraph, IOSpec, Positional
from diffrt.package.names import CONFIG_NAME

#: T5 tokens a prompt may take (Diffusers' `max_sequence_length` is at most 512 for SD3 and FLUX)
T5_LENGTH_RANGE = (1, 512)
#: FLUX's packed image tokens: 2x2 latent patches of up to LATENT_RANGE latent pixels a side
IMAGE_SEQUENCE_RANGE = (1, (LATENT_RANGE[1] // 2) ** 2)


def transformer_graph(folder: Path, class_name: str, variant: str | None) -> ComponentGraph:
    """The checkpoint's `transformer` folder as a ComponentGraph, by its Diffusers class."""
    if class_name == "SD3Transformer2DModel":
        return sd3_graph(folder, variant)
    if class_name == "FluxTransformer2DModel":
        return flux_graph(folder, variant)
    raise invalid("transformer class", "SD3Transformer2DModel or FluxTransformer2DModel", class_name, ConfigError)


def sd3_graph(folder: Path, variant: str | None) -> ComponentGraph:
    from diffrt.export.models import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", variant=variant,
                                                  dtype=torch.float32)
    config = model.config
    patch, table = int(config["patch_size"]), config.get("pos_embed_max_size")
    side = (patch, min(LATENT_RANGE[1], patch * int(table))) if table else (patch, LATENT_RANGE[1])
    latent = ("batch", config["in_channels"], "height", "width")
    inputs = [
        IOSpec("hidden_states", "float32", latent),
        IOSpec("encoder_hidden_states", "float32", ("batch", "sequence", config["joint_attention_dim"])),
        IOSpec("pooled_projections", "float32", ("batch", config["pooled_projection_dim"])),
        IOSpec("timestep", "float32", ("batch",), ("uniform", 0.0, 1000.0)),
    ]
    out = config["out_channels"] or config["in_channels"]
    outputs = [IOSpec("out_hidden_states", "float32", ("batch", out, "height", "width"))]
    sequence = (TEXT_LENGTH + T5_LENGTH_RANGE[0], TEXT_LENGTH + T5_LENGTH_RANGE[1])
    dims = {"batch": BATCH_RANGE, "height": side, "width": side, "sequence": sequence}
    # Distinct, non-square sizes (torch.export merges equal sizes and bakes sizes 0/1); the checks take others.
    trace = {"batch": 2, "height": 4 * patch, "width": 6 * patch, "sequence": TEXT_LENGTH + 9}
    checks = [{"batch": 1, "height": 2 * patch, "width": 2 * patch, "sequence": TEXT_LENGTH + 1},
              {"batch": 3, "height": 5 * patch, "width": 3 * patch, "sequence": TEXT_LENGTH + 16}]
    return _graph(model, inputs, outputs, dims, trace, checks, folder, ("timestep",))


def flux_graph(folder: Path, variant: str | None) -> ComponentGraph:
    from diffrt.export.models import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", variant=variant,
                                                   dtype=torch.float32)
    config = model.config
    channels = config["in_channels"]
    positions = ("uniform", 0.0, 64.0)
    inputs = [
        IOSpec("hidden_states", "float32", ("batch", "image_sequence", channels)),
        IOSpec("encoder_hidden_states", "float32", ("batch", "text_sequence", config["joint_attention_dim"])),
        IOSpec("pooled_projections", "float32", ("batch", config["pooled_projection_dim"])),
        IOSpec("timestep", "float32", ("batch",), ("uniform", 0.0, 1.0)),
        IOSpec("img_ids", "float32", ("image_sequence", 3), positions),
        IOSpec("txt_ids", "float32", ("text_sequence", 3), positions),
    ]
    keep = ["timestep", "img_ids", "txt_ids"]
    if config["guidance_embeds"]:
        inputs.append(IOSpec("guidance", "float32", ("batch",), ("uniform", 1.0, 10.0)))
        keep.append("guidance")
    out = config["out_channels"] or channels
    outputs = [IOSpec("out_hidden_states", "float32", ("batch", "image_sequence", out))]
    dims = {"batch": BATCH_RANGE, "image_sequence": IMAGE_SEQUENCE_RANGE, "text_sequence": T5_LENGTH_RANGE}
    trace = {"batch": 2, "image_sequence": 24, "text_sequence": 10}
    checks = [{"batch": 1, "image_sequence": 16, "text_sequence": 7},
              {"batch": 3, "image_sequence": 40, "text_sequence": 12}]
    return _graph(model, inputs, outputs, dims, trace, checks, folder, tuple(keep))


def _graph(model: Any, inputs: list[IOSpec], outputs: list[IOSpec], dims: dict[str, tuple[int, int]],
           trace: dict[str, int], checks: list[dict[str, int]], folder: Path,
           keep_float32: tuple[str, ...]) -> ComponentGraph:
    """Timesteps, guidance and rotary positions stay float32 inputs in reduced-precision packages (fractional
    timesteps and positions up to 256 lose digits in float16, and the model embeds them in float32 anyway)."""
    module = Positional(model, [spec.name for spec in inputs])
    return ComponentGraph("transformer", module, inputs, outputs, dims, trace, checks,
                          folder / "transformer" / CONFIG_NAME, keep_float32=keep_float32, parameter_root=model)
