"""Analytic FLOP count of one denoiser call (UNet, SD3's MMDiT, FLUX's transformer) from its diffusers config, for
the effective TFLOP/s of `diffrt bench`.

Counts the matrix work, as PyTorch's `FlopCounterMode` does: convolutions, linear layers and the two attention
products (Q·Kᵀ and softmax·V), 2 FLOPs per multiply-add. Norms, activations and softmax are left out (a few
percent of the time on CPU, far less of the arithmetic). The walk mirrors `UNet2DConditionModel.__init__`:
down blocks, the mid block, up blocks with their skip concatenations. The transformer counts mirror
`SD3Transformer2DModel` (patch embedding, joint attention over image + text tokens, SD3.5's second image-only
attention in `dual_attention_layers`, the last block's text stream `context_pre_only`) and `FluxTransformer2DModel`
(double-stream then single-stream blocks over the packed 2x2 latent patches; rotary embeddings are not matrix work).
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["unet_flops", "sd3_flops", "flux_flops", "denoiser_flops"]

#: text tokens the transformer sees with the pipelines' default `max_sequence_length`: SD3 77 CLIP + 256 T5 tokens
#: (zeros when the package has no T5, as in Diffusers), FLUX 512 T5 tokens
SD3_TEXT_TOKENS = 77 + 256
FLUX_TEXT_TOKENS = 512


def _conv(cin: int, cout: int, k: int, pixels: int) -> float:
    return 2.0 * cin * cout * k * k * pixels


def _linear(fin: int, fout: int, tokens: int) -> float:
    return 2.0 * fin * fout * tokens


def _resnet(cin: int, cout: int, pixels: int, temb: int) -> float:
    shortcut = _conv(cin, cout, 1, pixels) if cin != cout else 0.0
    return _conv(cin, cout, 3, pixels) + _conv(cout, cout, 3, pixels) + _linear(temb, cout, 1) + shortcut


def _transformer(c: int, pixels: int, layers: int, cross_dim: int, seq: int) -> float:
    """Transformer2DModel: proj_in/out, then per layer self-attention, cross-attention and a GEGLU feed-forward."""
    self_attn = 4 * _linear(c, c, pixels) + 2 * 2.0 * pixels * pixels * c
    cross_attn = 2 * _linear(c, c, pixels) + 2 * _linear(cross_dim, c, seq) + 2 * 2.0 * pixels * seq * c
    feed_forward = _linear(c, 8 * c, pixels) + _linear(4 * c, c, pixels)
    return 2 * _linear(c, c, pixels) + layers * (self_attn + cross_attn + feed_forward)


def _per_block(value: Any, count: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _embeddings(config: Mapping[str, Any], temb: int) -> float:
    c0 = config["block_out_channels"][0]
    flops = _linear(c0, temb, 1) + _linear(temb, temb, 1)
    if config.get("addition_embed_type") == "text_time":
        flops += _linear(config["projection_class_embeddings_input_dim"], temb, 1) + _linear(temb, temb, 1)
    return flops


def unet_flops(config: Mapping[str, Any], height: int, width: int, batch: int = 1, seq: int = 77) -> float:
    """FLOPs of one UNet forward on `batch` latents of `height` x `width` with `seq` text tokens."""
    channels = list(config["block_out_channels"])
    blocks = len(channels)
    layers = _per_block(config.get("layers_per_block", 2), blocks)
    depth = _per_block(config.get("transformer_layers_per_block", 1), blocks)
    cross = _per_block(config.get("cross_attention_dim", 1280), blocks)
    temb = config.get("time_embedding_dim") or 4 * channels[0]
    attn_down = ["CrossAttn" in name for name in config["down_block_types"]]
    attn_up = ["CrossAttn" in name for name in config["up_block_types"]]
    h, w = height, width
    flops = _embeddings(config, temb) + _conv(config.get("in_channels", 4), channels[0], 3, h * w)
    previous = channels[0]
    for i, out in enumerate(channels):  # down path; every output is kept as a skip for the up path
        for j in range(layers[i]):
            flops += _resnet(previous if j == 0 else out, out, h * w, temb)
            flops += _transformer(out, h * w, depth[i], cross[i], seq) if attn_down[i] else 0.0
        previous = out
        if i < blocks - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            flops += _conv(out, out, 3, h * w)
    mid = channels[-1]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        flops += 2 * _resnet(mid, mid, h * w, temb) + _transformer(mid, h * w, depth[-1], cross[-1], seq)
    flops += _up_path(channels, layers, depth, cross, attn_up, h, w, temb, seq)
    flops += _conv(channels[0], config.get("out_channels", 4), 3, height * width)
    return flops * batch


def _up_path(channels: list[int], layers: list[int], depth: list[int], cross: list[Any], attn: list[bool],
             h: int, w: int, temb: int, seq: int) -> float:
    rev, rev_layers, rev_depth, rev_cross = channels[::-1], layers[::-1], depth[::-1], cross[::-1]
    flops, previous = 0.0, rev[0]
    for i, out in enumerate(rev):
        skip_in = rev[min(i + 1, len(rev) - 1)]
        count = rev_layers[i] + 1
        for j in range(count):
            skip = skip_in if j == count - 1 else out
            flops += _resnet((previous if j == 0 else out) + skip, out, h * w, temb)
            flops += _transformer(out, h * w, rev_depth[i], rev_cross[i], seq) if attn[i] else 0.0
        previous = out
        if i < len(rev) - 1:
            h, w = h * 2, w * 2
            flops += _conv(out, out, 3, h * w)
    return flops


def _attention(dim: int, queries: int, keys: int) -> float:
    """Q·Kᵀ and softmax·V."""
    return 2 * 2.0 * queries * keys * dim


def _mlp(dim: int, tokens: int, mult: int = 4) -> float:
    return _linear(dim, mult * dim, tokens) + _linear(mult * dim, dim, tokens)


def sd3_flops(config: Mapping[str, Any], height: int, width: int, batch: int = 1, seq: int = SD3_TEXT_TOKENS) -> float:
    """FLOPs of one SD3 / SD3.5 MMDiT forward on `batch` latents of `height` x `width` with `seq` text tokens."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    context_dim = config.get("caption_projection_dim") or dim
    patch = config.get("patch_size", 2)
    tokens = (height // patch) * (width // patch)
    layers = config.get("num_layers", 18)
    dual = set(config.get("dual_attention_layers") or ())
    flops = _conv(config.get("in_channels", 16), dim, patch, tokens)
    flops += _linear(256, dim, 1) + _linear(dim, dim, 1)  # timestep embedding
    flops += _linear(config["pooled_projection_dim"], dim, 1) + _linear(dim, dim, 1)  # pooled text embedding
    flops += _linear(config["joint_attention_dim"], context_dim, seq)
    for i in range(layers):
        last = i == layers - 1  # context_pre_only: the text stream ends with this block's attention inputs
        flops += _linear(dim, (9 if i in dual else 6) * dim, 1)
        flops += _linear(dim, (2 if last else 6) * dim, 1)
        flops += 4 * _linear(dim, dim, tokens) + 3 * _linear(context_dim, dim, seq)
        flops += _attention(dim, tokens + seq, tokens + seq)
        if not last:
            flops += _linear(dim, context_dim, seq) + _mlp(context_dim, seq)
        if i in dual:
            flops += 4 * _linear(dim, dim, tokens) + _attention(dim, tokens, tokens)
        flops += _mlp(dim, tokens)
    flops += _linear(dim, 2 * dim, 1) + _linear(dim, patch * patch * config.get("out_channels", 16), tokens)
    return flops * batch


def flux_flops(config: Mapping[str, Any], height: int, width: int, batch: int = 1,
               seq: int = FLUX_TEXT_TOKENS) -> float:
    """FLOPs of one FLUX.1 transformer forward; `height` x `width` is the VAE latent (packed into 2x2 patches)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = (height // 2) * (width // 2)
    both = tokens + seq
    channels = config.get("in_channels", 64)
    flops = _linear(channels, dim, tokens) + _linear(config["joint_attention_dim"], dim, seq)
    flops += _linear(256, dim, 1) + _linear(dim, dim, 1)
    flops += _linear(config["pooled_projection_dim"], dim, 1) + _linear(dim, dim, 1)
    if config.get("guidance_embeds"):
        flops += _linear(256, dim, 1) + _linear(dim, dim, 1)
    double = 2 * _linear(dim, 6 * dim, 1) + 4 * _linear(dim, dim, tokens) + 4 * _linear(dim, dim, seq)
    double += _attention(dim, both, both) + _mlp(dim, tokens) + _mlp(dim, seq)
    single = _linear(dim, 3 * dim, 1) + 3 * _linear(dim, dim, both) + _linear(dim, 4 * dim, both)
    single += _attention(dim, both, both) + _linear(5 * dim, dim, both)
    flops += config.get("num_layers", 19) * double + config.get("num_single_layers", 38) * single
    out = config.get("out_channels") or channels
    flops += _linear(dim, 2 * dim, 1) + _linear(dim, config.get("patch_size", 1) ** 2 * out, tokens)
    return flops * batch


def denoiser_flops(name: str, config: Mapping[str, Any], height: int, width: int, batch: int = 1) -> float:
    """FLOPs of one call of the denoiser `name` ("unet" or "transformer", told apart by its `_class_name`) on
    latents of `height` x `width`."""
    if name == "unet":
        return unet_flops(config, height, width, batch)
    if "Flux" in str(config.get("_class_name", "")):
        return flux_flops(config, height, width, batch)
    return sd3_flops(config, height, width, batch)
