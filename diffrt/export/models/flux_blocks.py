"""FLUX.1 transformer blocks: adaptive norms, gelu-tanh feed-forward, qk-normed rotary attention, the dual-stream
(`FluxTransformerBlock`) and single-stream (`FluxSingleTransformerBlock`) blocks.

Names, shapes and arithmetic order follow diffusers (`normalization.py`, `attention.py`, `transformer_flux.py`) so
its state dict loads strictly and outputs match. Every attention is one `Attention.attend` call on [B, L, heads*d]
projections: qk RMSNorm and RoPE are applied per head before it (unflatten -> norm -> rope -> flatten), so
`lower_to_multi_head_attention` can switch each to the fused MultiHeadAttention op. Each block is small and
separately named so shared DiT blocks can replace them one by one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.errors import InputError
from diffrt.export.models.attention import Attention
from diffrt.export.models.flux_embeddings import apply_rotary_emb

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim with a learned scale (`torch.nn.RMSNorm` / diffusers' `RMSNorm`).

    Statistics in float32 whatever the input dtype, so a float16 export cannot overflow the sum of squares.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        normed = (hidden_states.float() * torch.rsqrt(variance + self.eps)).to(hidden_states.dtype)
        return normed * self.weight


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: LayerNorm modulated by the conditioning; returns the normed input and the MLP/gate terms."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """adaLN-Zero with shift, scale and one gate (the single-stream block's parallel attention + MLP)."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 3 * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa


class AdaLayerNormContinuous(nn.Module):
    """Final adaptive LayerNorm: note diffusers' order, the projection's first half is the scale, then the shift."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, eps: float = 1e-6):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, embedding_dim * 2)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class GELU(nn.Module):
    """Linear projection then tanh-approximated GELU (diffusers' `GELU(approximate="tanh")`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate="tanh")


class FeedForward(nn.Module):
    """diffusers' `FeedForward(activation_fn="gelu-approximate")`; `net.1` stands where its Dropout is."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class FluxAttention(Attention):
    """diffusers' `FluxAttention`: qk RMSNorm per head, RoPE, one `attend`.

    `added_kv_proj_dim` adds the text stream's projections (dual-stream blocks, `joint_forward`); `pre_only` drops
    the output projection (single-stream blocks project attention and MLP together).
    """

    def __init__(
        self, query_dim: int, heads: int, dim_head: int, added_kv_proj_dim: int | None = None, eps: float = 1e-6,
        pre_only: bool = False,
    ):
        super().__init__(query_dim, heads, dim_head, bias=True)
        self.pre_only = pre_only
        if pre_only:
            del self.to_out
        self.norm_q = RMSNorm(dim_head, eps)
        self.norm_k = RMSNorm(dim_head, eps)
        if added_kv_proj_dim is not None:
            inner_dim = heads * dim_head
            self.norm_added_q = RMSNorm(dim_head, eps)
            self.norm_added_k = RMSNorm(dim_head, eps)
            self.add_q_proj = nn.Linear(added_kv_proj_dim, inner_dim)
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner_dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner_dim)
            self.to_add_out = nn.Linear(inner_dim, query_dim)

    def _heads(self, projection: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """[B, L, heads*d] -> normed [B, L, heads, d]."""
        return norm(projection.unflatten(-1, (self.heads, -1)))

    def _rope_attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rotary_emb: RotaryEmbedding
    ) -> torch.Tensor:
        query, key = (apply_rotary_emb(t, rotary_emb).flatten(2) for t in (query, key))
        return self.attend(query, key, value)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
        image_rotary_emb: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """Self-attention over one (joint) sequence; the text-and-image attention is `joint_forward`."""
        if context is not None or image_rotary_emb is None:
            raise InputError("FluxAttention.forward takes no context and needs image_rotary_emb")
        query = self._heads(self.to_q(hidden_states), self.norm_q)
        key = self._heads(self.to_k(hidden_states), self.norm_k)
        attended = self._rope_attend(query, key, self.to_v(hidden_states), image_rotary_emb)
        return attended if self.pre_only else self.to_out[0](attended)

    def joint_forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, image_rotary_emb: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over [text; image] tokens with per-stream projections; returns (image, text) outputs."""
        query = torch.cat([self._heads(self.add_q_proj(encoder_hidden_states), self.norm_added_q),
                           self._heads(self.to_q(hidden_states), self.norm_q)], dim=1)
        key = torch.cat([self._heads(self.add_k_proj(encoder_hidden_states), self.norm_added_k),
                         self._heads(self.to_k(hidden_states), self.norm_k)], dim=1)
        value = torch.cat([self.add_v_proj(encoder_hidden_states), self.to_v(hidden_states)], dim=1)
        attended = self._rope_attend(query, key, value, image_rotary_emb)
        text_tokens = encoder_hidden_states.shape[1]  # symbolic under torch.export: a Shape op, not a constant
        return self.to_out[0](attended[:, text_tokens:]), self.to_add_out(attended[:, :text_tokens])


def _clip_float16(hidden_states: torch.Tensor) -> torch.Tensor:
    """Diffusers clamps float16 residual streams to the finite range so an overflow stays finite."""
    return hidden_states.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else hidden_states


class FluxTransformerBlock(nn.Module):
    """Dual-stream (MMDiT) block: separate modulation, projections and MLPs for image and text, joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, added_kv_proj_dim=dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
        image_rotary_emb: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (encoder_hidden_states, hidden_states), diffusers' order."""
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, temb)
        attn_output, context_attn_output = self.attn.joint_forward(norm_hidden, norm_context, image_rotary_emb)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        norm_hidden = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(norm_hidden)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * context_attn_output
        norm_context = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(norm_context)
        return _clip_float16(encoder_hidden_states), hidden_states


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
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, eps=1e-6, pre_only=True)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, image_rotary_emb: RotaryEmbedding
                ) -> torch.Tensor:
        norm_hidden, gate = self.norm(hidden_states, temb)
        mlp_hidden = self.act_mlp(self.proj_mlp(norm_hidden))
        attn_output = self.attn(norm_hidden, image_rotary_emb=image_rotary_emb)
        projected = self.proj_out(torch.cat([attn_output, mlp_hidden], dim=2))
        return _clip_float16(hidden_states + gate.unsqueeze(1) * projected)
