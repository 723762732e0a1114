"""ControlNetModel for export: SD 1.x / 2.x and SDXL ControlNets (diffusers' `ControlNetModel`).

Same constructor keywords, defaults and parameter names as diffusers, so a diffusers ControlNet state dict loads
strictly. The encoder half (conv_in, time and SDXL text_time embeddings, down blocks, mid block) is built by the
UNet's own builders from a UNet-shaped config; what ControlNet adds is the conditioning-image embedding and one 1x1
"zero convolution" per residual.

`forward` returns the residuals *unscaled*: `controlnet_conditioning_scale`, guess mode's 0.1..1 ramp and
`global_pool_conditions` are cheap elementwise work the runtime does in NumPy, so one graph serves every scale and
mode (diffusers multiplies in the same float32, so results are bit-identical for a scale of 1).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.models.unet import UNET_DEFAULTS, UNet2DConditionModel, per_block, validate_unet_config

# diffusers' ControlNetModel constructor keywords and defaults (config.json keys).
CONTROLNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "conditioning_channels": 3, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "attention_head_dim": 8, "num_attention_heads": None,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "projection_class_embeddings_input_dim": None,
    "controlnet_conditioning_channel_order": "rgb", "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "global_pool_conditions": False, "addition_embed_type_num_heads": 64,
}
CHANNEL_ORDERS = ("rgb", "bgr")
# The UNet builders read these UNet keys, which a ControlNet does not have: the ControlNet equivalents.
_UNET_ONLY = {"time_embedding_dim": None, "timestep_post_act": None, "time_cond_proj_dim": None,
              "time_embedding_act_fn": None, "center_input_sample": False, "conv_in_kernel": 3}


def unet_shaped_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The UNet config whose encoder half is this ControlNet's (up blocks mirrored only to satisfy the checks)."""
    shared = {key: value for key, value in cfg.items() if key in UNET_DEFAULTS}
    count = len(cfg["down_block_types"])
    unet = {**UNET_DEFAULTS, **shared, **_UNET_ONLY, "up_block_types": ["UpBlock2D"] * count}
    validate_unet_config(unet)
    return unet


class ControlNetConditioningEmbedding(nn.Module):
    """The conditioning image (pixels) -> a latent-sized feature map: conv + SiLU stacks with stride-2 steps."""

    def __init__(self, embedding_channels: int, conditioning_channels: int, block_out_channels: list[int]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        blocks = []
        for channel_in, channel_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            blocks.append(nn.Conv2d(channel_in, channel_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(channel_in, channel_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(block_out_channels[-1], embedding_channels, kernel_size=3, padding=1)

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        for block in self.blocks:
            embedding = F.silu(block(embedding))
        return self.conv_out(embedding)


class ControlNetModel(UNet2DConditionModel):
    """ControlNet; `ControlNetModel(**diffusers_config)` or `.from_pretrained(folder)`.

    It reuses the UNet's builders (its encoder half is a UNet's), but it is not a UNet: its forward returns the
    residuals `(down_block_res_samples..., mid_block_res_sample)` the UNet adds to its skips and mid block.
    """

    config_defaults = CONTROLNET_DEFAULTS

    def __init__(self, **config: Any):  # noqa: D107  (UNet2DConditionModel.__init__ is replaced, not extended)
        nn.Module.__init__(self)
        cfg = self.resolve_config(config)
        _validate(cfg)
        self._config = unet_shaped_config(cfg)
        self._controlnet_config = cfg
        self._blocks = per_block(self._config)
        channels = cfg["block_out_channels"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        time_embed_dim = self._build_time_embedding(self._config)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], cfg["conditioning_channels"], list(cfg["conditioning_embedding_out_channels"])
        )
        self.down_blocks = nn.ModuleList(self._down_block(i, time_embed_dim) for i in range(len(channels)))
        self.controlnet_down_blocks = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=1) for width in self.residual_channels()[:-1]
        )
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)
        self.mid_block = self._mid_block(time_embed_dim)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved diffusers ControlNet config (a copy)."""
        return dict(self._controlnet_config)

    def residual_channels(self) -> list[int]:
        """Channels of each down residual (conv_in's, then each layer's and downsampler's), then the mid one's."""
        channels, layers = self._config["block_out_channels"], self._config["layers_per_block"]
        widths = [channels[0]]
        for i, width in enumerate(channels):
            widths += [width] * (layers + (1 if i < len(channels) - 1 else 0))
        return widths + [channels[-1]]

    def forward(  # type: ignore[override]  # ControlNet inputs, not the UNet's
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Unscaled residuals for latents `sample` and the conditioning image `controlnet_cond` [B, 3, 8h, 8w]
        in [0, 1]: the down residuals in skip order, then the mid-block residual."""
        if self._controlnet_config["controlnet_conditioning_channel_order"] == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = self._embed_time(sample, timestep, text_embeds, time_ids, None)
        hidden_states = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [hidden_states]
        for down_block in self.down_blocks:
            hidden_states, states = down_block(hidden_states, emb, encoder_hidden_states)
            skips.extend(states)
        if self.mid_block is not None:
            hidden_states = self.mid_block(hidden_states, emb, encoder_hidden_states)
        down = [block(skip) for skip, block in zip(skips, self.controlnet_down_blocks)]
        return (*down, self.controlnet_mid_block(hidden_states))


def _validate(cfg: dict[str, Any]) -> None:
    """ConfigError naming the first ControlNet-only key this implementation does not support."""
    order = cfg["controlnet_conditioning_channel_order"]
    if order not in CHANNEL_ORDERS:
        raise invalid("controlnet_conditioning_channel_order", f"one of {CHANNEL_ORDERS}", order, ConfigError)
    if not isinstance(cfg["layers_per_block"], int):
        raise invalid("layers_per_block", "an int (diffusers' ControlNetModel takes one for all blocks)",
                      cfg["layers_per_block"], ConfigError)
    out_channels = cfg["conditioning_embedding_out_channels"]
    if not isinstance(out_channels, list) or not out_channels:
        raise invalid("conditioning_embedding_out_channels", "a non-empty list of ints", out_channels, ConfigError)
