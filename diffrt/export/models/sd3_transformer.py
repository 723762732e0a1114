"""SD3Transformer2DModel for export: the MMDiT of Stable Diffusion 3 medium and 3.5 medium / large.

Same constructor keywords, defaults, parameter names and outputs as diffusers' `SD3Transformer2DModel`, with a flat
`forward(hidden_states, encoder_hidden_states, pooled_projections, timestep) -> Tensor` (diffusers' `.sample`).
No ControlNet residuals, skip_layers, IP-Adapter or LoRA scale: what a deployed text-to-image step needs.

Export: every size inside forward comes from the input shapes (the position-embedding crop, the token split of the
joint attention, the unpatchify), so `torch.export` keeps batch, latent height / width and text length symbolic.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.models.blocks import ConfiguredModel
from diffrt.export.models.dit import (
    QK_NORMS,
    AdaLayerNormContinuous,
    CombinedTimestepTextProjEmbeddings,
    JointTransformerBlock,
)

# diffusers' SD3Transformer2DModel constructor keywords and defaults (config.json keys).
SD3_DEFAULTS: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
    "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
    "qk_norm": None,
}
POSITIVE_INT_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size")


def validate_sd3_config(cfg: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key whose value this implementation does not support."""
    for key in POSITIVE_INT_KEYS:
        # pos_embed_max_size=None would make diffusers interpolate a non-persistent table instead of cropping one;
        # no published SD3 checkpoint does that.
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise invalid(key, "a positive int", cfg[key], ConfigError)
    if cfg["qk_norm"] not in QK_NORMS:
        raise invalid("qk_norm", "one of " + ", ".join(repr(k) for k in QK_NORMS), cfg["qk_norm"], ConfigError)
    if cfg["out_channels"] is not None and (not isinstance(cfg["out_channels"], int) or cfg["out_channels"] < 1):
        raise invalid("out_channels", "a positive int or None (= in_channels)", cfg["out_channels"], ConfigError)
    layers = cfg["dual_attention_layers"]
    if not isinstance(layers, list) or any(not isinstance(i, int) or not 0 <= i < cfg["num_layers"] for i in layers):
        raise invalid("dual_attention_layers", f"a list of block indices in [0, {cfg['num_layers']})", layers,
                      ConfigError)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != inner:
        # diffusers' joint blocks take the context at the image width: other values fail inside its first block.
        raise invalid("caption_projection_dim", f"num_attention_heads * attention_head_dim ({inner})",
                      cfg["caption_projection_dim"], ConfigError)
    if inner % 4:
        raise invalid("num_attention_heads * attention_head_dim", "a multiple of 4 (2-D sincos embedding)", inner,
                      ConfigError)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim] as (sin | cos) of position x 10000^(-i / (dim/2)), computed in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = torch.outer(positions.to(torch.float64), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_table(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """[1, grid*grid, dim] float32 position table, row-major over a grid x grid patch grid (diffusers
    `get_2d_sincos_pos_embed(dim, grid, base_size=base_size)`): the first half of the channels encodes the
    column, the second the row, both measured in units of grid / base_size patches."""
    coords = torch.arange(grid, dtype=torch.float32) / (grid / base_size)
    rows, cols = coords.repeat_interleave(grid), coords.repeat(grid)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """Latents [B, C, H, W] -> patch tokens [B, (H/p)*(W/p), D] plus the centre crop of a fixed 2-D sincos table.

    diffusers `PatchEmbed(pos_embed_max_size=...)`: SD3 stores a pos_embed_max_size^2 table (a persistent buffer,
    so it is in the checkpoint) and each image uses its centre (H/p) x (W/p) window, which keeps the positions of
    every resolution centred on those seen at training. The window's offsets are computed from the input's shape,
    so they stay symbolic in an exported graph (one dynamic Slice on the table).
    """

    pos_embed: torch.Tensor  # [1, pos_embed_max_size**2, embed_dim] buffer

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int, pos_embed_max_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        table = sincos_2d_table(embed_dim, pos_embed_max_size, base_size=sample_size // patch_size)
        self.register_buffer("pos_embed", table, persistent=True)

    def cropped_pos_embed(self, height: int | torch.SymInt, width: int | torch.SymInt) -> torch.Tensor:
        """The [1, height*width, D] centre window of the table, for a patch grid of height x width."""
        size = self.pos_embed_max_size
        if not torch.compiler.is_exporting():
            # diffusers raises here too; under torch.export this Python check would become a guard on the dims.
            if height > size or width > size:
                raise ValueError(f"latent of {height}x{width} patches exceeds pos_embed_max_size {size}")
        top, left = (size - height) // 2, (size - width) // 2
        table = self.pos_embed.unflatten(1, (size, size))
        return table[:, top:top + height, left:left + width, :].flatten(1, 2)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        height, width = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        tokens = self.proj(latent).flatten(2).transpose(1, 2)
        return (tokens + self.cropped_pos_embed(height, width)).to(tokens.dtype)


class SD3Transformer2DModel(ConfiguredModel):
    """The SD3 / SD3.5 MMDiT: patchify + crop of the position table, context and conditioning embeddings,
    `num_layers` joint blocks, continuous adaLN, linear to patches, unpatchify.

    `SD3Transformer2DModel(**config)` takes diffusers' config keys (see `SD3_DEFAULTS`); unsupported values raise
    `ConfigError` naming the key.
    """

    config_defaults = SD3_DEFAULTS

    def __init__(self, **config: Any):
        super().__init__()
        cfg = self.resolve_config(config)
        validate_sd3_config(cfg)
        self._config = cfg
        heads, head_dim, layers = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
        inner = heads * head_dim
        self.patch_size = cfg["patch_size"]
        self.out_channels = cfg["out_channels"] or cfg["in_channels"]
        self.pos_embed = PatchEmbed(cfg["sample_size"], self.patch_size, cfg["in_channels"], inner,
                                    cfg["pos_embed_max_size"])
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(inner, cfg["pooled_projection_dim"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
        dual: Sequence[int] = cfg["dual_attention_layers"]
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(inner, heads, head_dim, context_pre_only=i == layers - 1, qk_norm=cfg["qk_norm"],
                                  use_dual_attention=i in dual)
            for i in range(layers)
        )
        self.norm_out = AdaLayerNormContinuous(inner, inner, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner, self.patch_size * self.patch_size * self.out_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, H, W] (H, W multiples of patch_size), T5+CLIP context [B, S, joint_attention_dim],
        pooled CLIP [B, pooled_projection_dim], float timestep [B] in [0, 1000] -> [B, out_channels, H, W]."""
        patch = self.patch_size
        height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
        hidden_states = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        context: torch.Tensor | None = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            assert context is not None  # only the last block drops the context stream
            context, hidden_states = block(hidden_states, context, temb)
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        # Unpatchify: token (h, w) carries a p x p x C patch, channels last (diffusers' "nhwpqc->nchpwq").
        patches = hidden_states.reshape(-1, height, width, patch, patch, self.out_channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(-1, self.out_channels, height * patch, width * patch)
