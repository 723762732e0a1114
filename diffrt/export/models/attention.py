"""Attention and transformer blocks, diffusers-named, each attention one `scaled_dot_product_attention` call.

The exporter lowers that single SDPA on [batch, heads, tokens, head_dim] tensors to the ONNX `Attention` op
(opset 23) for ONNX Runtime and to MatMul-Softmax-MatMul for TensorRT, so nothing here may split, slice or mask it.
For the CUDA target (`lower_to_multi_head_attention`) the whole attention on [batch, tokens, heads*head_dim]
projections is one `diffrt::multi_head_attention` op instead, which the exporter writes as ONNX Runtime's
`com.microsoft.MultiHeadAttention` (flash attention on CUDA, and no head split/merge transposes in the graph).
Mirrors diffusers' `Attention` + `AttnProcessor2_0`, `BasicTransformerBlock` (layer_norm, GEGLU) and the continuous
`Transformer2DModel`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.library.custom_op("diffrt::multi_head_attention", mutates_args=())
def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Attention on [B, L, heads*d] projections (ONNX Runtime's MultiHeadAttention contract, scale 1/sqrt(d))."""
    query, key, value = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (query, key, value))
    return F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2)


@multi_head_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def lower_to_multi_head_attention(module: nn.Module) -> int:
    """Make every `Attention` in `module` export as one MultiHeadAttention op; returns how many were switched."""
    switched = 0
    for child in module.modules():
        if isinstance(child, Attention):
            child.fused_op = True
            switched += 1
    return switched


class Attention(nn.Module):
    """Multi-head attention over token sequences [batch, tokens, channels]; self-attention when `context` is None."""

    #: export the attention as one `diffrt::multi_head_attention` op (the CUDA target)
    fused_op = False

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.upcast_attention = bool(upcast_attention)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner_dim, bias=bias)
        # Index 1 of diffusers' `to_out` is a Dropout without parameters; inference needs only the projection.
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden_states if context is None else context
        attended = self.attend(self.to_q(hidden_states), self.to_k(context), self.to_v(context))
        return self.to_out[0](attended)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """[B, L, heads*d] projections -> one SDPA on [B, heads, L, d] -> [B, L, heads*d] in the input dtype."""
        dtype = query.dtype
        if self.fused_op:
            # ORT's kernels (flash / memory-efficient) accumulate the logits and softmax in float32 for any input
            # type, which is what upcast_attention asks for.
            return torch.ops.diffrt.multi_head_attention(query, key, value, self.heads)
        if self.upcast_attention and dtype != torch.float32:
            # SD 2.x 768-v logits overflow float16 (max 65504) in Q.K^T and give NaN/black images; that is why its
            # config sets upcast_attention. PyTorch's fused kernels accumulate in float32 anyway, but the exported
            # MatMul-Softmax-MatMul (TensorRT) would not, so the graph itself must run this product in float32.
            query, key, value = query.float(), key.float(), value.float()
        query, key, value = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(query, key, value)
        return attended.transpose(1, 2).flatten(2).to(dtype)


class SpatialSelfAttention(Attention):
    """The VAE mid-block attention: GroupNorm, single-head self-attention over pixels, residual (diffusers
    `Attention(..., norm_num_groups, residual_connection=True, bias=True)`)."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__(channels, heads=heads, dim_head=channels // heads, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        tokens = self.group_norm(hidden_states).flatten(2).transpose(1, 2)
        attended = super().forward(tokens)
        return attended.transpose(1, 2).reshape(batch, channels, height, width) + hidden_states


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, half of it gates the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers `FeedForward` with GEGLU; `net.1` stands where diffusers keeps its (parameter-free) Dropout."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual."""

    norm2: nn.LayerNorm | None  # None, with attn2, in a block without cross-attention
    attn2: Attention | None

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.only_cross_attention = bool(only_cross_attention)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        attn1_context = cross_attention_dim if self.only_cross_attention else None
        self.attn1 = Attention(dim, heads, dim_head, attn1_context, upcast_attention=upcast_attention)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=1e-5)
            self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast_attention=upcast_attention)
        else:
            self.norm2, self.attn2 = None, None
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        attn1_context = context if self.only_cross_attention else None
        hidden_states = self.attn1(self.norm1(hidden_states), attn1_context) + hidden_states
        if self.attn2 is not None and self.norm2 is not None:
            hidden_states = self.attn2(self.norm2(hidden_states), context) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """Spatial transformer on feature maps: GroupNorm, project in (1x1 conv or linear), blocks, project out,
    residual."""

    proj_in: nn.Linear | nn.Conv2d
    proj_out: nn.Linear | nn.Conv2d

    def __init__(
        self,
        heads: int,
        dim_head: int,
        in_channels: int,
        num_layers: int,
        cross_attention_dim: int | None,
        norm_num_groups: int,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear_projection = bool(use_linear_projection)
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if self.use_linear_projection:
            self.proj_in, self.proj_out = nn.Linear(in_channels, inner_dim), nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, heads, dim_head, cross_attention_dim, only_cross_attention, upcast_attention
            )
            for _ in range(num_layers)
        )

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if not self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if self.use_linear_projection:
            hidden_states = self.proj_in(hidden_states)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, context)
        if self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear_projection:
            hidden_states = self.proj_out(hidden_states)
        return hidden_states + residual
