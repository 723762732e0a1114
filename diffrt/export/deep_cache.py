"""DeepCache for UNet packages: the UNet graph's extra output and the `unet_shallow` component (docs/package-format.md).

DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"; github horseee/DeepCache): the
UNet's deep features change little between adjacent denoising steps, so every N steps the full UNet runs and keeps
one hidden state of its up path, and the steps between run only a shallow path with that cached state standing in
for everything deeper. Its skip branches are the UNet's skip connections, shallowest first: branch 0 is conv_in's
output, taken by the last resnet of the last up block; then each down block's layers and downsampler (12 branches
in SD 1.x / 2.x, 9 in SDXL; with 3 per resolution level this is DeepCache's `cache_branch_id`, whose helper splits
it as `cache_block_id = id // 3`, `cache_layer_id = id % 3`). For branch b the cached feature is the hidden state
entering the up-path resnet that takes skip connection b (branch 0: the input of the last resnet; branch 2 in SD:
the output of `up_blocks[-2]`), and the shallow pass computes skip connections 0..b afresh (conv_in, then the down
path only as far as skip b) and runs the up path from that resnet on (`UNet2DConditionModel.forward_shallow`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from diffrt.errors import invalid
from diffrt.export.controlnet_graph import level_dims, residual_levels, with_levels
from diffrt.export.models import UNet2DConditionModel
from diffrt.export.onnx import ComponentGraph, IOSpec, Positional
from diffrt.package.names import DEEP_CACHE_FEATURE, UNET_SHALLOW


def branch_count(unet_config: Mapping[str, Any]) -> int:
    """DeepCache's skip branches of a UNet: its skip connections (the residual levels less the mid block)."""
    return len(residual_levels(unet_config)) - 1


def check_branch(branch: Any, unet_config: Mapping[str, Any]) -> int:
    """`deep_cache_branch` as an int in this UNet's range; InputError naming it and the range otherwise."""
    count = branch_count(unet_config)
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < count:
        raise invalid("deep_cache_branch", f"an int in [0, {count - 1}] (this UNet's {count} skip connections, "
                      "0 the shallowest: the least work per cached step)", branch)
    return branch


def feature_layout(unet_config: Mapping[str, Any], branch: int) -> tuple[int, int]:
    """(channels, resolution level) of the feature cached for `branch`: the hidden state entering the up-path
    resnet that takes skip connection `branch`, at that skip connection's level."""
    channels = list(unet_config["block_out_channels"])[::-1]  # the up blocks' output channels
    layers = unet_config["layers_per_block"]
    up_layers = list(layers)[::-1] if isinstance(layers, list) else [layers] * len(channels)
    index = branch_count(unet_config) - 1  # the up path takes the skip connections deepest first
    for block, count in enumerate(up_layers):
        for resnet in range(count + 1):
            if index == branch:
                # a block's first resnet takes the previous block's output (the mid block's, for the first block)
                width = channels[max(block - 1, 0)] if resnet == 0 else channels[block]
                return width, residual_levels(unet_config)[branch][1]
            index -= 1
    raise ValueError(f"deep_cache_branch {branch} is not a skip connection of this UNet")  # check_branch first


def feature_spec(unet_config: Mapping[str, Any], branch: int) -> IOSpec:
    width, level = feature_layout(unet_config, branch)
    return IOSpec(DEEP_CACHE_FEATURE, "float32", ("batch", width, *level_dims(level)))


class _UNetWithFeature(nn.Module):
    """Positional inputs -> (out_sample, deep_cache_feature)."""

    def __init__(self, unet: UNet2DConditionModel, names: list[str], branch: int):
        super().__init__()
        self.unet, self.names, self.branch = unet, names, branch

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        named: dict[str, Any] = dict(zip(self.names, inputs))
        out, feature = self.unet.forward_features(**named, deep_cache_branch=self.branch)
        assert feature is not None  # forward_features returns one whenever a branch is given
        return out, feature


class _ShallowUNet(nn.Module):
    """Positional inputs (the UNet's, then deep_cache_feature) -> out_sample of the shallow pass."""

    def __init__(self, unet: UNet2DConditionModel, names: list[str], branch: int):
        super().__init__()
        self.unet, self.names, self.branch = unet, names, branch

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *plain, feature = inputs
        return self.unet.forward_shallow(self.branch, feature, **dict(zip(self.names, plain)))


def _unet_of(graph: ComponentGraph) -> tuple[UNet2DConditionModel, list[str], Mapping[str, Any]]:
    positional = graph.module
    assert isinstance(positional, Positional) and isinstance(positional.model, UNet2DConditionModel)  # unet_graph's
    unet = positional.model
    return unet, positional.input_names, unet.config


def add_feature_output(graph: ComponentGraph, branch: int) -> ComponentGraph:
    """The UNet `graph` (from `unet_graph`) that also outputs DeepCache's feature for `branch`."""
    unet, names, config = _unet_of(graph)
    graph.module = _UNetWithFeature(unet, names, branch)
    graph.outputs = graph.outputs + [feature_spec(config, branch)]
    _add_level(graph, config, branch)
    return graph


def shallow_unet_graph(graph: ComponentGraph, branch: int) -> ComponentGraph:
    """`unet_shallow` from a UNet `graph` (from `unet_graph`, its own loaded module): the UNet's inputs and
    `deep_cache_feature` -> `out_sample`. The exported graph holds only the weights the shallow pass uses; the
    parameter map (LoRA) names them by the UNet's parameter names."""
    unet, names, config = _unet_of(graph)
    graph.name = UNET_SHALLOW
    graph.module = _ShallowUNet(unet, names, branch)
    graph.inputs = graph.inputs + [feature_spec(config, branch)]
    graph.config_file = None  # unet/config.json describes the model; this graph is a part of it
    _add_level(graph, config, branch)
    return graph


def _add_level(graph: ComponentGraph, config: Mapping[str, Any], branch: int) -> None:
    """The `height_k` / `width_k` dims of a feature below the latent resolution (level 0 uses height / width)."""
    if feature_layout(config, branch)[1] > 0:
        with_levels(graph, config)
