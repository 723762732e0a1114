"""ControlNet graphs: the ControlNet component and the UNet's residual inputs (docs/package-format.md).

A ControlNet gives one residual per UNet skip connection (latent level k of the encoder: `height_k` x `width_k`,
ceil(height / 2**k)) and one for the mid block; the UNet of a package with ControlNets takes them as inputs, named
as in `diffrt.package.names`. A package without ControlNets keeps the plain UNet graph.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from diffrt.export.onnx import LATENT_RANGE, ComponentGraph, IOSpec, Positional, _text_time_sizes, unet_sizes
from diffrt.package.files import read_json
from diffrt.package.names import (
    CONFIG_NAME,
    CONTROLNET_DOWN_OUTPUT,
    CONTROLNET_MID_OUTPUT,
    INDEX_NAME,
    UNET_DOWN_RESIDUAL,
    UNET_MID_RESIDUAL,
)


def text_time_facts(root: Path) -> tuple[int | None, bool]:
    """SDXL: the pooled text width (text_encoder_2's projection) and whether time ids carry aesthetic scores, read
    from a checkpoint or package folder `root` (None, False without text_encoder_2)."""
    pooled = read_json(root / "text_encoder_2" / CONFIG_NAME).get("projection_dim")
    return pooled, bool(read_json(root / INDEX_NAME).get("requires_aesthetics_score"))


def residual_levels(unet_config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(channels, latent level) of each UNet skip connection, then of the mid block's output."""
    channels, layers = unet_config["block_out_channels"], unet_config["layers_per_block"]
    per_block = layers if isinstance(layers, list) else [layers] * len(channels)
    levels = [(channels[0], 0)]
    for i, width in enumerate(channels):
        levels += [(width, i)] * per_block[i]
        if i < len(channels) - 1:
            levels.append((width, i + 1))
    return levels + [(channels[-1], len(channels) - 1)]


def level_dims(level: int) -> tuple[str, str]:
    return ("height", "width") if level == 0 else (f"height_{level}", f"width_{level}")


def level_sizes(sizes: Mapping[str, int], levels: int) -> dict[str, int]:
    """`sizes` with each deeper level's sides added: a stride-2 convolution (padding 1) gives ceil(side / 2)."""
    extra = {}
    for level in range(1, levels):
        extra[f"height_{level}"] = math.ceil(sizes["height"] / 2**level)
        extra[f"width_{level}"] = math.ceil(sizes["width"] / 2**level)
    return {**sizes, **extra}


def _level_ranges(levels: int) -> dict[str, tuple[int, int]]:
    low, high = LATENT_RANGE
    return {name: (math.ceil(low / 2**level), math.ceil(high / 2**level))
            for level in range(1, levels) for name in level_dims(level)}


def residual_specs(unet_config: Mapping[str, Any], down_name: str, mid_name: str) -> list[IOSpec]:
    levels = residual_levels(unet_config)
    specs = []
    for i, (channels, level) in enumerate(levels):
        name = mid_name if i == len(levels) - 1 else down_name.format(i)
        specs.append(IOSpec(name, "float32", ("batch", channels, *level_dims(level))))
    return specs


def with_levels(graph: ComponentGraph, unet_config: Mapping[str, Any]) -> None:
    """Add the deeper levels' dims, trace sizes and check sizes to `graph` (in place): for inputs or outputs
    shaped like a UNet level (ControlNet residuals, DeepCache's feature)."""
    count = len(unet_config["block_out_channels"])
    graph.dims.update(_level_ranges(count))
    graph.trace_sizes = level_sizes(graph.trace_sizes, count)
    graph.check_sizes = [level_sizes(sizes, count) for sizes in graph.check_sizes]


class _UNetWithResiduals(nn.Module):
    """Positional inputs -> the UNet with its ControlNet residuals gathered into the keywords it takes."""

    def __init__(self, unet: nn.Module, names: list[str], residuals: int):
        super().__init__()
        self.unet, self.names, self.residuals = unet, names, residuals

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        plain, residuals = inputs[: -self.residuals], inputs[-self.residuals:]
        return self.unet(**dict(zip(self.names, plain)), down_block_additional_residuals=list(residuals[:-1]),
                         mid_block_additional_residual=residuals[-1])


def add_residual_inputs(graph: ComponentGraph) -> ComponentGraph:
    """The UNet `graph` (from `unet_graph`) taking ControlNet residuals as extra inputs."""
    positional = graph.module
    assert isinstance(positional, Positional)  # what unet_graph builds
    unet = positional.model
    config: Mapping[str, Any] = unet.config  # type: ignore[assignment]  # our UNet2DConditionModel's config dict
    specs = residual_specs(config, UNET_DOWN_RESIDUAL, UNET_MID_RESIDUAL)
    graph.module = _UNetWithResiduals(unet, positional.input_names, len(specs))
    graph.inputs = graph.inputs + specs
    with_levels(graph, config)
    return graph


def controlnet_graph(name: str, folder: Path, unet_config: Mapping[str, Any], pooled_dim: int | None,
                     aesthetics: bool) -> ComponentGraph:
    """ControlNet `name` from its diffusers folder: the UNet's conditioning inputs (sample, timestep,
    encoder_hidden_states [, text_embeds, time_ids]) + `controlnet_cond` [batch, 3, 8h, 8w] in [0, 1] -> the
    unscaled residuals of the UNet `unet_config`, named as `diffrt.package.names` says."""
    from diffrt.export.models import ControlNetModel

    model = ControlNetModel.from_pretrained(folder, dtype=torch.float32)
    config = model.config
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    inputs = [
        IOSpec("sample", "float32", ("batch", config["in_channels"], "height", "width")),
        IOSpec("timestep", "float32", ("batch",), ("uniform", 0.0, 999.0)),
        IOSpec("encoder_hidden_states", "float32", ("batch", "sequence", config["cross_attention_dim"])),
    ]
    if config["addition_embed_type"] == "text_time":
        pooled, count = _text_time_sizes(config, pooled_dim, aesthetics)
        inputs += [IOSpec("text_embeds", "float32", ("batch", pooled)),
                   IOSpec("time_ids", "float32", ("batch", count), ("uniform", 0.0, 1024.0))]
    inputs.append(IOSpec("controlnet_cond", "float32",
                         ("batch", config["conditioning_channels"], "image_height", "image_width"),
                         ("uniform", 0.0, 1.0)))
    outputs = residual_specs(unet_config, CONTROLNET_DOWN_OUTPUT, CONTROLNET_MID_OUTPUT)
    dims, trace, checks = unet_sizes(len(config["block_out_channels"]))
    image_range = (factor * LATENT_RANGE[0], factor * LATENT_RANGE[1])
    dims.update(image_height=image_range, image_width=image_range)
    graph = ComponentGraph(
        name, Positional(model, [spec.name for spec in inputs]), inputs, outputs, dims,
        _with_image(trace, factor), [_with_image(sizes, factor) for sizes in checks],
        folder / CONFIG_NAME, keep_float32=("timestep", "time_ids"),
    )
    with_levels(graph, unet_config)
    return graph


def _with_image(sizes: Mapping[str, int], factor: int) -> dict[str, int]:
    return {**sizes, "image_height": factor * sizes["height"], "image_width": factor * sizes["width"]}
