"""AutoencoderKL for export: encoder -> quant_conv (moments) and post_quant_conv -> decoder, diffusers-named.

`encode` returns the moments tensor [B, 2*latent, h, w] (mean and log-variance; sampling and the scaling factor are
the runtime's job, in NumPy) and `decode` takes the unscaled latent. The single-input wrappers are what the ONNX
exporter traces: `VaeEncoderForExport` (`sample` -> `latent_parameters`), `VaeDecoderForExport`
(`latent_sample` -> `sample`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.models.attention import SpatialSelfAttention
from diffrt.export.models.blocks import ConfiguredModel, DownBlock, Downsample2D, ResnetBlock2D, Upsample2D, activation

if TYPE_CHECKING:
    from diffrt.export.models.tiny_vae import AutoencoderTiny

# diffusers' AutoencoderKL constructor keywords and defaults (config.json keys).
VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
VAE_EPS = 1e-6  # diffusers hard-codes this epsilon for every VAE norm


class VaeMidBlock(nn.Module):
    """diffusers UNetMidBlock2D as the VAE uses it: resnet, single-head self-attention over pixels, resnet."""

    def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, VAE_EPS, act_fn) for _ in range(2))
        # heads = channels // attention_head_dim, and the VAE sets attention_head_dim = channels.
        attentions = [SpatialSelfAttention(channels, heads=1, groups=groups, eps=VAE_EPS)] if add_attention else []
        self.attentions = nn.ModuleList(attentions)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states)
        for attention in self.attentions:
            hidden_states = attention(hidden_states)
        return self.resnets[1](hidden_states)


class UpDecoderBlock(nn.Module):
    """diffusers UpDecoderBlock2D: resnets, then an optional nearest-2x upsampler."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, act_fn: str, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, VAE_EPS, act_fn)
            for i in range(layers)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return self.upsamplers[0](hidden_states) if self.upsamplers is not None else hidden_states


class Encoder(nn.Module):
    """Image [B, in, H, W] -> [B, 2*latent, H/2^(n-1), W/2^(n-1)] (mean and log-variance before quant_conv)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        channels, groups, act = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], channels[0], kernel_size=3, stride=1, padding=1)
        blocks = []
        for i, out_channels in enumerate(channels):
            in_channels = channels[max(i - 1, 0)]
            resnets = [
                ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, None, groups, VAE_EPS, act)
                for j in range(cfg["layers_per_block"])
            ]
            # padding=0: the encoder pads right/bottom only, as the original LDM autoencoder did.
            downsample = Downsample2D(out_channels, padding=0) if i < len(channels) - 1 else None
            blocks.append(DownBlock(resnets, None, downsample))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = VaeMidBlock(channels[-1], groups, act, cfg["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample, _ = down_block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latent [B, latent, h, w] -> image [B, out, h*2^(n-1), w*2^(n-1)]."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        channels, groups, act = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["act_fn"]
        self.conv_in = nn.Conv2d(cfg["latent_channels"], channels[-1], kernel_size=3, stride=1, padding=1)
        self.mid_block = VaeMidBlock(channels[-1], groups, act, cfg["mid_block_add_attention"])
        reversed_channels = list(reversed(channels))
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                reversed_channels[max(i - 1, 0)], out_channels, cfg["layers_per_block"] + 1, groups, act,
                upsample=i < len(channels) - 1,
            )
            for i, out_channels in enumerate(reversed_channels)
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for up_block in self.up_blocks:
            sample = up_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


def validate_vae_config(cfg: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key whose value this implementation does not support."""
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(kind != block for kind in cfg[key]) or len(cfg[key]) != len(cfg["block_out_channels"]):
            raise invalid(key, f"a list of {block!r}, one per block_out_channels entry", cfg[key], ConfigError)
    activation(cfg["act_fn"])


class AutoencoderKL(ConfiguredModel):
    """The KL autoencoder of SD 1.x / 2.x / SDXL; `AutoencoderKL(**diffusers_config)` or `.from_config(config)`."""

    config_defaults = VAE_DEFAULTS

    def __init__(self, **config: Any):
        super().__init__()
        cfg = self.resolve_config(config)
        validate_vae_config(cfg)
        self._config = cfg
        latent = cfg["latent_channels"]
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg["use_post_quant_conv"] else None

    def encode(self, sample: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent distribution parameters (mean, log-variance concatenated on channels)."""
        moments = self.encoder(sample)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def decode(self, latent_sample: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image in about [-1, 1]."""
        if self.post_quant_conv is not None:
            latent_sample = self.post_quant_conv(latent_sample)
        return self.decoder(latent_sample)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the distribution mean (no sampling): decode(mean(encode(sample)))."""
        mean, _ = self.encode(sample).chunk(2, dim=1)
        return self.decode(mean)

    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the pre-0.14 diffusers attention keys (query/key/value/proj_attn), as diffusers does on load."""
        renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
        converted = {}
        for key, value in state_dict.items():
            if ".mid_block.attentions." in f".{key}":
                for old, new in renames.items():
                    key = key.replace(old, new)
            converted[key] = value
        return converted

    @property
    def scaling_factor(self) -> float | None:
        return self._config.get("scaling_factor")

    @property
    def shift_factor(self) -> float | None:
        return self._config.get("shift_factor")

    @property
    def latents_mean(self) -> list[float] | None:
        return self._config.get("latents_mean")

    @property
    def latents_std(self) -> list[float] | None:
        return self._config.get("latents_std")

    @property
    def force_upcast(self) -> bool | None:
        return self._config.get("force_upcast")


class VaeEncoderForExport(nn.Module):
    """`sample` -> `latent_parameters` (AutoencoderTiny: the latent itself), one input and one output for export."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample)


class VaeDecoderForExport(nn.Module):
    """`latent_sample` -> `sample`, one input and one output for the ONNX exporter."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample)
