"""FluxTransformer2DModel for export: FLUX.1 dev / schnell (and variants with other channel counts, e.g. Fill).

Same constructor keywords, defaults, parameter names and outputs as diffusers' `FluxTransformer2DModel`, with a flat
`forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None)
-> Tensor`: no LoRA scale, ControlNet residuals, IP-Adapter or gradient checkpointing, no complex numbers or float64,
and every size read from tensors stays symbolic under torch.export, so batch, image and text lengths export dynamic.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from diffrt.errors import ConfigError, InputError, invalid
from diffrt.export.models.blocks import ConfiguredModel
from diffrt.export.models.dit import AdaLayerNormContinuous, CombinedTimestepTextProjEmbeddings
from diffrt.export.models.flux_blocks import FluxSingleTransformerBlock, FluxTransformerBlock
from diffrt.export.models.flux_embeddings import FluxPosEmbed

logger = logging.getLogger(__name__)

# diffusers' FluxTransformer2DModel constructor keywords and defaults (config.json keys).
FLUX_DEFAULTS: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}
POSITIVE_KEYS = ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                 "pooled_projection_dim")
ROPE_THETA = 10000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_flux_config(cfg: dict[str, Any]) -> None:
    """Raise ConfigError naming the first key whose value cannot build a FLUX transformer."""
    for key in POSITIVE_KEYS:
        if not _is_int(cfg[key]) or cfg[key] < 1:
            raise invalid(key, "a positive int", cfg[key], ConfigError)
    for key in ("num_layers", "num_single_layers"):
        if not _is_int(cfg[key]) or cfg[key] < 0:
            raise invalid(key, "a non-negative int", cfg[key], ConfigError)
    if cfg["out_channels"] is not None and (not _is_int(cfg["out_channels"]) or cfg["out_channels"] < 1):
        raise invalid("out_channels", "None or a positive int", cfg["out_channels"], ConfigError)
    if not isinstance(cfg["guidance_embeds"], bool):
        raise invalid("guidance_embeds", "one of True, False", cfg["guidance_embeds"], ConfigError)
    axes = cfg["axes_dims_rope"]
    head_dim = cfg["attention_head_dim"]
    if (not isinstance(axes, list) or not axes or any(not _is_int(d) or d < 2 or d % 2 for d in axes)
            or sum(axes) != head_dim):
        raise invalid("axes_dims_rope", f"a list of positive even ints summing to attention_head_dim ({head_dim})",
                      axes, ConfigError)


class FluxTransformer2DModel(ConfiguredModel):
    """FLUX.1 transformer; `FluxTransformer2DModel(**diffusers_config)`, `.from_config` or
    `.from_pretrained(folder, subfolder="transformer")`."""

    config_defaults = FLUX_DEFAULTS

    def __init__(self, **config: Any):
        super().__init__()
        cfg = self.resolve_config(config)
        validate_flux_config(cfg)
        self._config = cfg
        self.out_channels = cfg["out_channels"] or cfg["in_channels"]
        self.inner_dim = inner_dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.guidance_embeds = cfg["guidance_embeds"]
        self.pos_embed = FluxPosEmbed(theta=ROPE_THETA, axes_dim=cfg["axes_dims_rope"])
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            inner_dim, cfg["pooled_projection_dim"], guidance=self.guidance_embeds
        )
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], inner_dim)
        self.x_embedder = nn.Linear(cfg["in_channels"], inner_dim)
        heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        self.transformer_blocks = nn.ModuleList(
            FluxTransformerBlock(inner_dim, heads, head_dim) for _ in range(cfg["num_layers"])
        )
        self.single_transformer_blocks = nn.ModuleList(
            FluxSingleTransformerBlock(inner_dim, heads, head_dim) for _ in range(cfg["num_single_layers"])
        )
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, eps=1e-6)
        self.proj_out = nn.Linear(inner_dim, cfg["patch_size"] ** 2 * self.out_channels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed latents [B, S_img, in_channels] -> prediction [B, S_img, patch_size**2 * out_channels].

        `timestep` and `guidance` are [B] as Diffusers' FluxPipeline passes them: the sigma (timestep / 1000) and the
        raw guidance scale (e.g. 3.5, not divided); both are multiplied by 1000 here, as Diffusers does. `guidance`
        is required exactly when the config sets `guidance_embeds` (FLUX.1-dev). `img_ids` [S_img, 3] and `txt_ids`
        [S_txt, 3] are float position ids shared by the whole batch.
        """
        if self.guidance_embeds != (guidance is not None):
            expected = "a [batch] tensor" if self.guidance_embeds else "None (config guidance_embeds is False)"
            raise invalid("guidance", expected, None if guidance is None else tuple(guidance.shape), InputError)
        hidden_states = self.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections, guidance)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        image_rotary_emb = self.pos_embed(torch.cat((_ids_2d(txt_ids), _ids_2d(img_ids)), dim=0))

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, image_rotary_emb)
        text_tokens = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        for single_block in self.single_transformer_blocks:
            joint = single_block(joint, temb, image_rotary_emb)
        hidden_states = joint[:, text_tokens:]
        return self.proj_out(self.norm_out(hidden_states, temb))


def _ids_2d(ids: torch.Tensor) -> torch.Tensor:
    """Diffusers' deprecated batched ids [B, S, 3]: it uses the first row; so do we."""
    if ids.ndim == 3:
        logger.warning("position ids with a batch dimension are deprecated in diffusers; using the first row")
        return ids[0]
    return ids
