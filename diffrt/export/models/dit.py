"""Building blocks of diffusion transformers (DiT / MMDiT: SD3, SD3.5, FLUX), diffusers-named for strict loading.

What lives here is shared by every DiT we export: the adaptive LayerNorms that modulate each block from the
conditioning vector (adaLN-Zero, Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), RMSNorm for the
per-head query/key normalisation of SD3.5 and FLUX, the gelu-tanh feed-forward, the timestep (+ guidance) +
pooled-text conditioning embedding, the rotary embedding's rotation, `JointAttention`, the MMDiT attention over image
and text tokens concatenated along the sequence (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"), and `JointTransformerBlock`, the dual-stream block of SD3 and FLUX. What only FLUX
has (its rotary position table, the single-stream block) is in `flux_blocks` / `flux_embeddings`.

Parameter names follow diffusers' `normalization.py`, `embeddings.py`, `attention.py` and `attention_processor.py`;
each forward keeps diffusers' operation order so float32 outputs agree to rounding. Dropout is left out: inference.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.models.attention import Attention
from diffrt.export.models.blocks import TimestepEmbedding, Timesteps

#: per-head query/key normalisations (diffusers `Attention(qk_norm=...)`) that have a variant for the context stream
QK_NORMS = (None, "layer_norm", "rms_norm")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (Zhang & Sennrich 2019), diffusers `RMSNorm`.

    The mean square is taken in float32 whatever the input type, as diffusers does: a float16 sum of squares of
    64 activations overflows easily. Without a weight the result goes back to the input type. With input and weight
    of one dtype (what `convert_module` gives) this is also `torch.nn.RMSNorm`'s arithmetic, which diffusers' FLUX
    uses for its q/k norms; they differ only for a float16/bfloat16 input with a float32 weight (float32 out here).
    """

    weight: nn.Parameter | None

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight is None:
            return hidden_states.to(input_dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return hidden_states * self.weight


def qk_norm_layer(kind: str | None, head_dim: int, eps: float) -> nn.Module | None:
    """The per-head norm diffusers builds for `qk_norm=kind` (None: no norm), with a learnt scale per channel."""
    if kind is None:
        return None
    if kind == "layer_norm":
        return nn.LayerNorm(head_dim, eps=eps, elementwise_affine=True)
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps=eps)
    raise invalid("qk_norm", "one of " + ", ".join(repr(k) for k in QK_NORMS), kind, ConfigError)


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample scale and shift [B, C] broadcast over the tokens of [B, L, C]; `1 + scale` as DiT does."""
    return normed * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (diffusers `AdaLayerNormZero` without its class-label embedding): one linear on SiLU(emb) gives
    shift/scale/gate for the attention and shift/scale/gate for the MLP.

    Returns (modulated x, gate_msa, shift_mlp, scale_mlp, gate_mlp); the block applies the MLP ones itself after
    its own LayerNorm.
    """

    #: modulation vectors the linear produces, each embedding_dim wide
    chunks: ClassVar[int] = 6

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, self.chunks * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, hidden_states: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        return modulate(self.norm(hidden_states), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroX(AdaLayerNormZero):
    """SD3.5's adaLN-Zero for blocks with a second (image-only) attention (diffusers `SD35AdaLayerNormZeroX`):
    nine chunks, the last three modulate the same LayerNorm output for `attn2`.

    Returns (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, x2, gate_msa2), diffusers' order.
    """

    chunks: ClassVar[int] = 9

    def forward(self, hidden_states: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        chunks = self.linear(self.silu(emb)).chunk(9, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = chunks
        normed = self.norm(hidden_states)
        return (modulate(normed, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                modulate(normed, shift_msa2, scale_msa2), gate_msa2)


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by a conditioning vector, scale first then shift (diffusers `AdaLayerNormContinuous`,
    norm_type "layer_norm"): the final norm of SD3 / FLUX and the context norm of SD3's last block."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, elementwise_affine: bool = False,
                 eps: float = 1e-6, bias: bool = True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, embedding_dim * 2, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, eps=eps, elementwise_affine=elementwise_affine, bias=bias)

    def forward(self, hidden_states: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
        # diffusers casts the SiLU output to x's dtype: the conditioning may be float32 in a reduced-precision model.
        scale, shift = self.linear(self.silu(conditioning_embedding).to(hidden_states.dtype)).chunk(2, dim=1)
        return modulate(self.norm(hidden_states), shift, scale)


class GELUProjection(nn.Module):
    """Linear then GELU (diffusers `GELU` activation module, which owns the projection as `proj`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh"):
        super().__init__()
        self.approximate = approximate
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class GeluFeedForward(nn.Module):
    """diffusers `FeedForward(dim, dim_out, activation_fn="gelu-approximate")`: `net.0.proj`, GELU-tanh, `net.2`.

    `net.1` is where diffusers keeps its parameter-free Dropout, so the indices (and the state-dict keys) match.
    """

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, approximate: str = "tanh"):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GELUProjection(dim, inner_dim, approximate), nn.Identity(),
                                  nn.Linear(inner_dim, dim_out or dim)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


class TextProjection(nn.Module):
    """Two-layer MLP on a pooled text embedding (diffusers `PixArtAlphaTextProjection`); SD3 and FLUX use SiLU."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None, act_fn: str = "silu"):
        super().__init__()
        acts: dict[str, Callable[[], nn.Module]] = {"silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}
        if act_fn not in acts:
            raise invalid("act_fn", f"one of {sorted(acts)}", act_fn, ConfigError)
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = acts[act_fn]()
        self.linear_2 = nn.Linear(hidden_size, out_features or hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """The DiT conditioning vector: MLP(sinusoidal(timestep, 256 channels, cos first)) + MLP(pooled text).

    SD3 and FLUX feed timesteps in [0, 1000] (sigma * 1000) as floats. `guidance=True` adds `guidance_embedder`, an
    MLP on the same sinusoid of the guidance scale (x 1000), summed as (timestep + guidance) + text: diffusers'
    `CombinedTimestepGuidanceTextProjEmbeddings` (FLUX.1-dev), same parameter names otherwise.
    """

    guidance_embedder: TimestepEmbedding | None

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, guidance: bool = False):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.guidance_embedder = TimestepEmbedding(256, embedding_dim) if guidance else None
        self.text_embedder = TextProjection(pooled_projection_dim, embedding_dim, act_fn="silu")

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        """`guidance` is used only by a model built with `guidance=True` (its caller checks that it is given)."""
        # The sinusoid is float32; diffusers casts it to the pooled embedding's dtype before the MLP.
        dtype = pooled_projection.dtype
        conditioning = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if self.guidance_embedder is not None and guidance is not None:
            conditioning = conditioning + self.guidance_embedder(self.time_proj(guidance).to(dtype))
        return conditioning + self.text_embedder(pooled_projection)


def apply_rotary_emb(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotary position embedding on [B, L, heads*d] projections; cos/sin are [L, d] (FLUX: interleaved pairs, from
    `flux_embeddings.FluxPosEmbed`).

    diffusers `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`: channel pairs (2i, 2i+1) are rotated,
    computed in float32 and cast back.
    """
    dtype = hidden.dtype
    per_head = hidden.unflatten(-1, (heads, -1))  # [B, L, H, d]
    real, imag = per_head.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (per_head.float() * cos + rotated.float() * sin).to(dtype).flatten(2)


class JointAttention(Attention):
    """MMDiT attention: image and context tokens attend jointly in one SDPA (diffusers `Attention` with
    `JointAttnProcessor2_0`, or FLUX's `FluxAttention`).

    Each stream has its own q/k/v projections (image: `to_q/k/v`, context: `add_q/k/v_proj`), its own optional
    per-head q/k norm (`norm_q/k`, `norm_added_q/k`) and its own output projection (`to_out.0`, `to_add_out`). The
    two sequences are concatenated, attended once through `Attention.attend` (so `lower_to_multi_head_attention`
    applies), and split back. Without a context (`context_dim=None`, or `context=None`) it is self-attention with
    optional q/k norm: SD3.5's second attention `attn2`.

    `context_pre_only`: the context stream ends here (SD3's last block), so there is no `to_add_out` and the context
    output is returned unprojected, as diffusers does. `pre_only`: no `to_out` either (FLUX's single blocks).
    `context_first`: concatenation order (SD3: image then context; FLUX: context then image).
    """

    norm_q: nn.Module | None
    norm_k: nn.Module | None
    norm_added_q: nn.Module | None
    norm_added_k: nn.Module | None
    add_q_proj: nn.Linear | None
    add_k_proj: nn.Linear | None
    add_v_proj: nn.Linear | None
    to_add_out: nn.Linear | None

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 qk_norm: str | None = None, eps: float = 1e-6, context_pre_only: bool = False,
                 pre_only: bool = False, context_first: bool = False, bias: bool = True):
        super().__init__(dim, heads, dim_head, bias=bias)
        inner_dim = heads * dim_head
        self.context_first = context_first
        if pre_only:
            self.to_out = nn.ModuleList()  # no parameters, so no state-dict keys
        self.norm_q, self.norm_k = qk_norm_layer(qk_norm, dim_head, eps), qk_norm_layer(qk_norm, dim_head, eps)
        self.add_q_proj = self.add_k_proj = self.add_v_proj = self.to_add_out = None
        self.norm_added_q = self.norm_added_k = None
        if context_dim is not None:
            self.add_q_proj = nn.Linear(context_dim, inner_dim)
            self.add_k_proj = nn.Linear(context_dim, inner_dim)
            self.add_v_proj = nn.Linear(context_dim, inner_dim)
            self.norm_added_q = qk_norm_layer(qk_norm, dim_head, eps)
            self.norm_added_k = qk_norm_layer(qk_norm, dim_head, eps)
            if not context_pre_only:
                self.to_add_out = nn.Linear(inner_dim, context_dim)

    def _per_head(self, projected: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """Normalise each head's channels of a [B, L, heads*d] projection (unflatten -> norm -> flatten)."""
        if norm is None:
            return projected
        return norm(projected.unflatten(-1, (self.heads, -1))).flatten(2)

    def _context_qkv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.add_q_proj is None or self.add_k_proj is None or self.add_v_proj is None:
            raise TypeError("JointAttention built without context_dim cannot take a context")
        query = self._per_head(self.add_q_proj(context), self.norm_added_q)
        key = self._per_head(self.add_k_proj(context), self.norm_added_k)
        return query, key, self.add_v_proj(context)

    def forward(  # type: ignore[override]  # returns both streams, unlike Attention
        self, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image output, context output or None). `rotary_emb`: (cos, sin) [L_total, d] over the joint sequence,
        applied after the q/k norms (FLUX); SD3 has no rotary embedding."""
        query = self._per_head(self.to_q(hidden_states), self.norm_q)
        key = self._per_head(self.to_k(hidden_states), self.norm_k)
        value = self.to_v(hidden_states)
        if context is not None:
            streams = [(query, key, value), self._context_qkv(context)]
            if self.context_first:
                streams.reverse()
            query, key, value = (torch.cat(parts, dim=1) for parts in zip(*streams))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb, heads=self.heads)
            key = apply_rotary_emb(key, *rotary_emb, heads=self.heads)
        attended = self.attend(query, key, value)
        context_out = None
        if context is not None:
            # Split by the context length: a symbolic size under torch.export, so the sequences stay dynamic.
            split = context.shape[1] if self.context_first else hidden_states.shape[1]
            first, second = attended[:, :split], attended[:, split:]
            attended, context_out = (second, first) if self.context_first else (first, second)
            if self.to_add_out is not None:
                context_out = self.to_add_out(context_out)
        if len(self.to_out):
            attended = self.to_out[0](attended)
        return attended, context_out


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-Zero-modulated joint attention and a gelu-tanh MLP per stream, each with a gated
    residual (diffusers `JointTransformerBlock`; with `context_first=True, qk_norm="rms_norm"` and a rotary
    embedding, the arithmetic of FLUX's `FluxTransformerBlock`, which adds only a float16 clip of the context).

    SD3.5 blocks in `dual_attention_layers` add a second, image-only attention `attn2` (modulated by the extra chunks
    of `AdaLayerNormZeroX`). SD3's last block is `context_pre_only`: its context stream only feeds the attention
    (continuous adaLN, no context output).
    """

    norm1: AdaLayerNormZero
    norm1_context: AdaLayerNormZero | AdaLayerNormContinuous
    attn2: JointAttention | None
    norm2_context: nn.LayerNorm | None
    ff_context: GeluFeedForward | None

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool = False,
                 qk_norm: str | None = None, use_dual_attention: bool = False, context_first: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = AdaLayerNormZeroX(dim) if use_dual_attention else AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, head_dim, context_dim=dim, qk_norm=qk_norm, eps=eps,
                                   context_pre_only=context_pre_only, context_first=context_first)
        self.attn2 = JointAttention(dim, heads, head_dim, qk_norm=qk_norm, eps=eps) if use_dual_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = GeluFeedForward(dim, dim)
        self.norm2_context = None if context_pre_only else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = None if context_pre_only else GeluFeedForward(dim, dim)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(context, hidden_states), diffusers' order; the context is None after a context_pre_only block.
        `rotary_emb`: (cos, sin) over the joint sequence, for the joint attention (FLUX)."""
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(hidden_states, temb)
        if isinstance(self.norm1_context, AdaLayerNormContinuous):
            normed_context, context_mods = self.norm1_context(context, temb), None
        else:
            normed_context, *context_mods = self.norm1_context(context, temb)
        attn_output, context_attn_output = self.attn(normed, normed_context, rotary_emb)
        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_output
        if self.attn2 is not None:
            normed2, gate_msa2 = dual
            hidden_states = hidden_states + gate_msa2.unsqueeze(1) * self.attn2(normed2)[0]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(
            modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        if context_mods is None or self.ff_context is None or self.norm2_context is None:
            return None, hidden_states
        assert context_attn_output is not None  # a joint attention with a context returns its output
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_mods
        context = context + c_gate_msa.unsqueeze(1) * context_attn_output
        context = context + c_gate_mlp.unsqueeze(1) * self.ff_context(
            modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return context, hidden_states
