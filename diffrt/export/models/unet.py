"""UNet2DConditionModel for export: SD 1.x / 2.x, SDXL base and refiner, inpainting, LCM, SSD-1B-style variants.

Same constructor keywords, defaults, parameter names and outputs as diffusers' `UNet2DConditionModel`, but a flat
`forward(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None) -> Tensor`
with no hooks, processors or branches on tensor values. Options outside the supported set raise `ConfigError`.
"""
from __future__ import annotations

from typing import Any, Sequence, cast

import torch
from torch import nn

from diffrt.errors import ConfigError, InputError, invalid
from diffrt.export.models.attention import Transformer2DModel
from diffrt.export.models.blocks import (
    ConfiguredModel,
    DownBlock,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Upsample2D,
    activation,
)

# diffusers' UNet2DConditionModel constructor keywords and defaults (config.json keys).
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}
# Keys with no effect on the supported block types (SimpleCrossAttn / ResnetDownsample blocks, training dropout) are
# accepted with any value; these keys select features we do not implement, so only the listed values pass.
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None),
    "addition_embed_type": (None, "text_time"),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default",),
    "attention_type": ("default",),
    "dual_cross_attention": (False, None),
    "class_embeddings_concat": (False, None),
}
DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
PER_BLOCK_KEYS = (
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "layers_per_block",
    "transformer_layers_per_block", "reverse_transformer_layers_per_block", "only_cross_attention",
)


def _one_of(allowed: Sequence[Any]) -> str:
    return "one of " + ", ".join(repr(value) for value in allowed)


def validate_unet_config(cfg: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key whose value this implementation does not support."""
    for key, allowed in SUPPORTED_VALUES.items():
        if cfg[key] not in allowed:
            raise invalid(key, _one_of(allowed), cfg[key], ConfigError)
    for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        if any(block not in allowed for block in cfg[key]):
            raise invalid(key, f"a list of {_one_of(allowed)}", cfg[key], ConfigError)
    count = len(cfg["down_block_types"])
    for key in ("up_block_types", "block_out_channels") + PER_BLOCK_KEYS:
        if isinstance(cfg[key], list) and len(cfg[key]) != count:
            raise invalid(key, f"a single value or one per block ({count}, as down_block_types)", cfg[key], ConfigError)
    nested = isinstance(cfg["transformer_layers_per_block"], list) and any(
        isinstance(layers, list) for layers in cfg["transformer_layers_per_block"]
    )
    if nested and cfg["reverse_transformer_layers_per_block"] is None:
        raise invalid("reverse_transformer_layers_per_block", "set when transformer_layers_per_block is nested",
                      None, ConfigError)
    if cfg["addition_embed_type"] == "text_time":
        for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
            if not isinstance(cfg[key], int):
                raise invalid(key, "an int when addition_embed_type is 'text_time'", cfg[key], ConfigError)
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if not isinstance(cfg[key], int) or cfg[key] % 2 == 0:
            raise invalid(key, "an odd int", cfg[key], ConfigError)
    if not isinstance(cfg["norm_num_groups"], int):
        raise invalid("norm_num_groups", "an int (GroupNorm everywhere)", cfg["norm_num_groups"], ConfigError)
    activation(cfg["act_fn"])


def _expand(value: Any, count: int) -> list[Any]:
    return list(value) if isinstance(value, list) else [value] * count


def per_block(cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-block settings in build order, with diffusers' reversal rules for the up path."""
    count = len(cfg["down_block_types"])
    heads = _expand(cfg["num_attention_heads"] or cfg["attention_head_dim"], count)
    cross = _expand(cfg["cross_attention_dim"], count)
    layers = _expand(cfg["layers_per_block"], count)
    transformer_layers = _expand(cfg["transformer_layers_per_block"], count)
    only_cross = _expand(cfg["only_cross_attention"], count)
    reverse_layers = cfg["reverse_transformer_layers_per_block"] or transformer_layers[::-1]

    def block(kind: str, i: int, num_layers: int, depth: Any, reverse: bool) -> dict[str, Any]:
        pick = (lambda values: values[count - 1 - i]) if reverse else (lambda values: values[i])
        return {
            "type": kind, "layers": num_layers, "heads": pick(heads), "cross_attention_dim": pick(cross),
            "transformer_layers": _expand(depth, num_layers), "only_cross_attention": bool(pick(only_cross)),
        }

    down = [block(kind, i, layers[i], transformer_layers[i], False) for i, kind in enumerate(cfg["down_block_types"])]
    up = [
        block(kind, i, layers[count - 1 - i] + 1, reverse_layers[i], True)
        for i, kind in enumerate(cfg["up_block_types"])
    ]
    mid_depth = transformer_layers[-1]
    mid_layers = mid_depth[0] if isinstance(mid_depth, list) else mid_depth
    return {"down": down, "up": up, "mid_transformer_layers": mid_layers}


class UpBlock(nn.Module):
    """diffusers UpBlock2D / CrossAttnUpBlock2D: each resnet first concatenates the newest skip connection. The UNet
    runs it layer by layer (`UNet2DConditionModel.up_path`), so DeepCache can enter or leave it between resnets."""

    def __init__(
        self, resnets: Sequence[nn.Module], attentions: Sequence[nn.Module] | None, upsample: Upsample2D | None
    ):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample is not None else None

    def layer(self, i: int, hidden_states: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor,
              context: torch.Tensor) -> torch.Tensor:
        """Resnet `i` on the hidden state concatenated with its skip connection, then its spatial transformer."""
        hidden_states = self.resnets[i](torch.cat([hidden_states, skip], dim=1), temb)
        if self.attentions is not None:
            hidden_states = self.attentions[i](hidden_states, context)
        return hidden_states

    def upsample(self, hidden_states: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
        return self.upsamplers[0](hidden_states, size) if self.upsamplers is not None else hidden_states


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn (one transformer between two resnets) or UNetMidBlock2D without attention."""

    def __init__(self, resnets: Sequence[nn.Module], attentions: Sequence[nn.Module] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, context)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class UNet2DConditionModel(ConfiguredModel):
    """Conditional UNet; `UNet2DConditionModel(**diffusers_config)` or `.from_config(config)`."""

    config_defaults = UNET_DEFAULTS
    add_time_proj: Timesteps | None  # SDXL's text_time conditioning only; set with add_embedding
    add_embedding: TimestepEmbedding | None

    def __init__(self, **config: Any):
        super().__init__()
        cfg = self.resolve_config(config)
        validate_unet_config(cfg)
        self._config = cfg
        self._blocks = per_block(cfg)
        channels = cfg["block_out_channels"]
        kernel = cfg["conv_in_kernel"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], kernel, padding=(kernel - 1) // 2)
        time_embed_dim = self._build_time_embedding(cfg)
        self.down_blocks = nn.ModuleList(self._down_block(i, time_embed_dim) for i in range(len(channels)))
        self.mid_block = self._mid_block(time_embed_dim)
        self.up_blocks = nn.ModuleList(self._up_block(i, time_embed_dim) for i in range(len(channels)))
        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], channels[0], eps=cfg["norm_eps"])
        self.conv_act = activation(cfg["act_fn"])
        kernel = cfg["conv_out_kernel"]
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], kernel, padding=(kernel - 1) // 2)

    def _build_time_embedding(self, cfg: dict[str, Any]) -> int:
        base = cfg["block_out_channels"][0]
        time_embed_dim = cfg["time_embedding_dim"] or base * 4
        self.time_proj = Timesteps(base, cfg["flip_sin_to_cos"], cfg["freq_shift"])
        self.time_embedding = TimestepEmbedding(
            base, time_embed_dim, cfg["act_fn"], post_act_fn=cfg["timestep_post_act"],
            cond_proj_dim=cfg["time_cond_proj_dim"],
        )
        if cfg["addition_embed_type"] == "text_time":
            self.add_time_proj = Timesteps(cfg["addition_time_embed_dim"], cfg["flip_sin_to_cos"], cfg["freq_shift"])
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], time_embed_dim)
        else:
            self.add_time_proj, self.add_embedding = None, None
        act = cfg["time_embedding_act_fn"]
        self.time_embed_act = activation(act, "time_embedding_act_fn") if act is not None else None
        return time_embed_dim

    def _resnet(self, in_channels: int, out_channels: int, temb: int, scale: float = 1.0) -> ResnetBlock2D:
        cfg = self._config
        return ResnetBlock2D(
            in_channels, out_channels, temb, cfg["norm_num_groups"], cfg["norm_eps"], cfg["act_fn"], scale
        )

    def _transformer(
        self, block: dict[str, Any], channels: int, num_layers: int, only_cross: bool
    ) -> Transformer2DModel:
        cfg = self._config
        heads = block["heads"]
        return Transformer2DModel(
            heads, channels // heads, channels, num_layers, block["cross_attention_dim"], cfg["norm_num_groups"],
            cfg["use_linear_projection"], only_cross, cfg["upcast_attention"],
        )

    def _attentions(self, block: dict[str, Any], channels: int) -> list[Transformer2DModel]:
        """One spatial transformer per resnet of a cross-attention block."""
        only_cross = block["only_cross_attention"]
        return [self._transformer(block, channels, depth, only_cross) for depth in block["transformer_layers"]]

    def _down_block(self, i: int, temb: int) -> DownBlock:
        block, channels = self._blocks["down"][i], self._config["block_out_channels"]
        in_channels, out_channels = channels[max(i - 1, 0)], channels[i]
        layers = block["layers"]
        resnets = [self._resnet(in_channels if j == 0 else out_channels, out_channels, temb) for j in range(layers)]
        attentions = self._attentions(block, out_channels) if block["type"] == "CrossAttnDownBlock2D" else None
        downsample = Downsample2D(out_channels, self._config["downsample_padding"]) if i < len(channels) - 1 else None
        return DownBlock(resnets, attentions, downsample)

    def _mid_block(self, temb: int) -> MidBlock | None:
        cfg, block = self._config, self._blocks["down"][-1]
        if cfg["mid_block_type"] is None:
            return None
        channels, scale = cfg["block_out_channels"][-1], cfg["mid_block_scale_factor"]
        if cfg["mid_block_type"] == "UNetMidBlock2D":
            return MidBlock([self._resnet(channels, channels, temb, scale)], None)
        resnets = [self._resnet(channels, channels, temb, scale) for _ in range(2)]
        layers = self._blocks["mid_transformer_layers"]
        return MidBlock(resnets, [self._transformer(block, channels, layers, only_cross=False)])

    def _up_block(self, i: int, temb: int) -> UpBlock:
        block = self._blocks["up"][i]
        reversed_channels = list(reversed(self._config["block_out_channels"]))
        last = len(reversed_channels) - 1
        prev_channels, out_channels = reversed_channels[max(i - 1, 0)], reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, last)]
        layers = block["layers"]
        resnets = []
        for j in range(layers):
            skip_channels = skip_in if j == layers - 1 else out_channels
            resnet_in = (prev_channels if j == 0 else out_channels) + skip_channels
            resnets.append(self._resnet(resnet_in, out_channels, temb))
        attentions = self._attentions(block, out_channels) if block["type"] == "CrossAttnUpBlock2D" else None
        return UpBlock(resnets, attentions, Upsample2D(out_channels) if i < last else None)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (or v / x0, per the checkpoint) for `sample` [B, C, H, W] at `timestep` [B] or [].

        ControlNet residuals, when given, are added to the skip connections (one per skip, in order) and to the
        mid block's output, as diffusers does."""
        return self.forward_features(sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond,
                                     down_block_additional_residuals, mid_block_additional_residual)[0]

    def forward_features(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        deep_cache_branch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`, and DeepCache's feature for skip branch `deep_cache_branch` (None: no feature): the hidden
        state entering the up-path resnet that takes skip connection `deep_cache_branch` (see `forward_shallow`)."""
        emb = self._embed_time(sample, timestep, text_embeds, time_ids, timestep_cond)
        hidden_states, skips = self.down_path(sample, emb, encoder_hidden_states)
        if down_block_additional_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_block_additional_residuals, strict=True)]
        if self.mid_block is not None:
            hidden_states = self.mid_block(hidden_states, emb, encoder_hidden_states)
        if mid_block_additional_residual is not None:
            hidden_states = hidden_states + mid_block_additional_residual
        hidden_states, feature = self.up_path(hidden_states, skips, emb, encoder_hidden_states, deep_cache_branch)
        return self.head(hidden_states), feature

    def forward_shallow(
        self,
        deep_cache_branch: int,
        deep_cache_feature: torch.Tensor,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DeepCache's partial pass (Ma et al. 2023): skip connections 0..`deep_cache_branch` computed afresh, the
        cached feature of an earlier full pass (`forward_features`) standing in for everything deeper, then the up
        path from the resnet that takes skip connection `deep_cache_branch`."""
        emb = self._embed_time(sample, timestep, text_embeds, time_ids, timestep_cond)
        _, skips = self.down_path(sample, emb, encoder_hidden_states, last_skip=deep_cache_branch)
        hidden_states, _ = self.up_path(deep_cache_feature, skips, emb, encoder_hidden_states)
        return self.head(hidden_states)

    def skip_count(self) -> int:
        """The skip connections (DeepCache's skip branches): conv_in's output, each down block's layers and
        downsampler."""
        blocks = [cast(DownBlock, block) for block in self.down_blocks]
        return 1 + sum(len(block.resnets) + int(block.downsamplers is not None) for block in blocks)

    def down_path(self, sample: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                  last_skip: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in and the down blocks: (output, skip connections in order). `last_skip`: stop once skip
        connections 0..`last_skip` exist."""
        if self._config["center_input_sample"]:
            sample = 2 * sample - 1.0
        hidden_states = self.conv_in(sample)
        skips = [hidden_states]
        for down_block in self.down_blocks:
            if last_skip is not None and len(skips) > last_skip:
                break
            stop = None if last_skip is None else last_skip + 1 - len(skips)
            hidden_states, states = down_block(hidden_states, emb, context, stop)
            skips.extend(states)
        return hidden_states, skips

    def up_path(self, hidden_states: torch.Tensor, skips: Sequence[torch.Tensor], emb: torch.Tensor,
                context: torch.Tensor, capture: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The up blocks, which take the skip connections deepest first, starting at the resnet that takes the last
        of `skips` (all of them: the whole up path; the shallowest ones: DeepCache's shallow pass). `capture`: also
        return the hidden state entering the resnet that takes skip connection `capture`."""
        captured = None
        index = self.skip_count() - 1  # the skip connection the next resnet takes
        for module in self.up_blocks:
            up_block = cast(UpBlock, module)  # a ModuleList iterates as plain nn.Module
            ran = False
            for i in range(len(up_block.resnets)):
                if index < len(skips):
                    if index == capture:
                        captured = hidden_states
                    hidden_states = up_block.layer(i, hidden_states, skips[index], emb, context)
                    ran = True
                index -= 1
            if ran and up_block.upsamplers is not None:
                # Upsample to the next skip connection's size, so odd latent sides (e.g. 1000 px / 8) round-trip.
                hidden_states = up_block.upsample(hidden_states, skips[index].shape[-2:])
        return hidden_states, captured

    def head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))

    def _embed_time(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeds: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None]
        t_emb = self.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.add_embedding is not None:
            emb = emb + self._text_time_embedding(text_embeds, time_ids, emb.dtype)
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    def _text_time_embedding(
        self, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """SDXL micro-conditioning: pooled text embedding + sinusoidal embeddings of the size/crop/score ids."""
        expected = "a tensor for a UNet with addition_embed_type 'text_time' (SDXL)"
        if text_embeds is None:
            raise invalid("text_embeds", expected, None, InputError)
        if time_ids is None:
            raise invalid("time_ids", expected, None, InputError)
        # _embed_time calls this only when add_embedding is set, and _build_time_embedding sets both together
        assert self.add_time_proj is not None and self.add_embedding is not None
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
        add_embeds = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1).to(dtype)
        return self.add_embedding(add_embeds)

