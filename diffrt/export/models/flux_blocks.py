"""FLUX.1 transformer blocks: the dual-stream (`FluxTransformerBlock`) and single-stream
(`FluxSingleTransformerBlock`) blocks, and the single block's adaLN (`AdaLayerNormZeroSingle`).

Everything FLUX shares with SD3 (adaLN-Zero, continuous adaLN, RMSNorm, the gelu-tanh feed-forward, the qk-normed
rotary joint attention, the MMDiT block itself) comes from `dit`; here is only what FLUX alone has. Names, shapes and
arithmetic order follow diffusers (`transformer_flux.py`, `normalization.py`) so its state dict loads strictly and
outputs match. Every attention is one `Attention.attend` call on [B, L, heads*d] projections, so
`lower_to_multi_head_attention` can switch each to the fused MultiHeadAttention op.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from diffrt.export.models.dit import AdaLayerNormZero, JointAttention, JointTransformerBlock, modulate

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


class AdaLayerNormZeroSingle(AdaLayerNormZero):
    """adaLN-Zero with shift, scale and one gate (diffusers `AdaLayerNormZeroSingle`): the single-stream block's
    attention and MLP run in parallel on one modulated input and share the gate. Returns (modulated x, gate)."""

    chunks: ClassVar[int] = 3

    def forward(self, hidden_states: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return modulate(self.norm(hidden_states), shift_msa, scale_msa), gate_msa


def _clip_float16(hidden_states: torch.Tensor) -> torch.Tensor:
    """Diffusers clamps float16 residual streams to the finite range so an overflow stays finite."""
    return hidden_states.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else hidden_states


class FluxTransformerBlock(JointTransformerBlock):
    """Dual-stream (MMDiT) block: `dit.JointTransformerBlock` in FLUX's layout (RMS q/k norms, [text; image] joint
    sequence, rotary embedding), whose context output diffusers clips to the float16 range."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__(dim, num_attention_heads, attention_head_dim, qk_norm="rms_norm", context_first=True,
                         eps=eps)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                rotary_emb: RotaryEmbedding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (encoder_hidden_states, hidden_states), diffusers' order."""
        context_out, hidden_states = super().forward(hidden_states, context, temb, rotary_emb)
        assert context_out is not None  # not context_pre_only: the context stream goes on
        return _clip_float16(context_out), hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block on the joint [text; image] sequence: attention and MLP in parallel, one fused proj_out.

    Unlike diffusers' block, which concatenates text and image on entry and splits them on exit, this one takes and
    returns the joint sequence: the model concatenates once before the single blocks and splits once after, the
    same arithmetic without 2 copies of the activations per block.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = JointAttention(dim, num_attention_heads, attention_head_dim, qk_norm="rms_norm", eps=1e-6,
                                   pre_only=True)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: RotaryEmbedding
                ) -> torch.Tensor:
        norm_hidden, gate = self.norm(hidden_states, temb)
        mlp_hidden = self.act_mlp(self.proj_mlp(norm_hidden))
        attn_output, _ = self.attn(norm_hidden, rotary_emb=image_rotary_emb)
        projected = self.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
        return _clip_float16(hidden_states + gate.unsqueeze(1) * projected)
