"""AutoencoderTiny (TAESD): a plain conv/ReLU autoencoder, a fast drop-in for the KL VAE, diffusers-named.

`encode` returns the latent directly (no distribution), `decode` maps it back to an image in [-1, 1]; both follow
diffusers' `AutoencoderTiny` including its input/output rescaling and the decoder's soft clamp.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.models.blocks import ConfiguredModel, activation

TINY_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "encoder_block_out_channels": (64, 64, 64, 64),
    "decoder_block_out_channels": (64, 64, 64, 64), "act_fn": "relu", "upsample_fn": "nearest", "latent_channels": 4,
    "upsampling_scaling_factor": 2, "num_encoder_blocks": (1, 3, 3, 3), "num_decoder_blocks": (3, 3, 3, 1),
    "latent_magnitude": 3, "latent_shift": 0.5, "force_upcast": False, "scaling_factor": 1.0, "shift_factor": 0.0,
    # diffusers registers this alias of decoder_block_out_channels in every saved config.
    "block_out_channels": None,
}


class AutoencoderTinyBlock(nn.Module):
    """Three 3x3 convs with activations, plus a (1x1 when widths differ) skip, fused by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            activation(act_fn),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            activation(act_fn),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
        )
        same_width = in_channels == out_channels
        self.skip = nn.Identity() if same_width else nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Upsample(nn.Module):
    """Parameter-free interpolation standing where diffusers keeps an `nn.Upsample`."""

    def __init__(self, scale_factor: int, mode: str):
        super().__init__()
        self.scale_factor, self.mode = float(scale_factor), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode)


class EncoderTiny(nn.Module):
    """Image in [-1, 1] -> latent; each stage after the first starts with a stride-2 conv."""

    def __init__(
        self, in_channels: int, out_channels: int, num_blocks: Sequence[int], channels: Sequence[int], act_fn: str
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i, num_block in enumerate(num_blocks):
            width = channels[i]
            if i == 0:
                layers.append(nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
            else:
                layers.append(nn.Conv2d(width, width, kernel_size=3, padding=1, stride=2, bias=False))
            layers.extend(AutoencoderTinyBlock(width, width, act_fn) for _ in range(num_block))
        layers.append(nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TAESD works on images in [0, 1].
        return self.layers(x.add(1).div(2))


class DecoderTiny(nn.Module):
    """Latent -> image in [-1, 1]; the input is soft-clamped to (-3, 3) first."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        channels, act_fn = cfg["decoder_block_out_channels"], cfg["act_fn"]
        layers: list[nn.Module] = [nn.Conv2d(cfg["latent_channels"], channels[0], kernel_size=3, padding=1)]
        layers.append(activation(act_fn))
        num_blocks = cfg["num_decoder_blocks"]
        for i, num_block in enumerate(num_blocks):
            is_final = i == len(num_blocks) - 1
            width = channels[i]
            layers.extend(AutoencoderTinyBlock(width, width, act_fn) for _ in range(num_block))
            if not is_final:
                layers.append(Upsample(cfg["upsampling_scaling_factor"], cfg["upsample_fn"]))
            out_width = cfg["out_channels"] if is_final else width
            layers.append(nn.Conv2d(width, out_width, kernel_size=3, padding=1, bias=is_final))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x / 3) * 3
        return self.layers(x).mul(2).sub(1)


class AutoencoderTiny(ConfiguredModel):
    """TAESD / TAESDXL; `AutoencoderTiny(**diffusers_config)` or `.from_config(config)`."""

    config_defaults = TINY_VAE_DEFAULTS

    def __init__(self, **config: Any):
        super().__init__()
        cfg = self.resolve_config(config)
        for side in ("encoder", "decoder"):
            channels, blocks = f"{side}_block_out_channels", f"num_{side}_blocks"
            if len(cfg[channels]) != len(cfg[blocks]):
                raise invalid(blocks, f"as long as {channels} ({len(cfg[channels])})", cfg[blocks], ConfigError)
        if cfg["upsample_fn"] not in ("nearest", "bilinear", "bicubic"):
            raise invalid("upsample_fn", "one of 'nearest', 'bilinear', 'bicubic'", cfg["upsample_fn"], ConfigError)
        cfg["block_out_channels"] = cfg["decoder_block_out_channels"]
        self._config = cfg
        self.encoder = EncoderTiny(
            cfg["in_channels"], cfg["latent_channels"], cfg["num_encoder_blocks"], cfg["encoder_block_out_channels"],
            cfg["act_fn"],
        )
        self.decoder = DecoderTiny(cfg)

    def encode(self, sample: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> latent (already in the diffusion model's latent space; scaling_factor is 1)."""
        return self.encoder(sample)

    def decode(self, latent_sample: torch.Tensor) -> torch.Tensor:
        """Latent -> image in [-1, 1]."""
        return self.decoder(latent_sample)

    @property
    def scaling_factor(self) -> float:
        return self._config["scaling_factor"]

    @property
    def shift_factor(self) -> float:
        return self._config["shift_factor"]

    @property
    def force_upcast(self) -> bool:
        return self._config["force_upcast"]
