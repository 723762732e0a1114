"""Analytic FLOP count of one UNet call, from its diffusers config (for the effective TFLOP/s of `diffrt bench`).

Counts the matrix work, as PyTorch's `FlopCounterMode` does: convolutions, linear layers and the two attention
products (Q·Kᵀ and softmax·V), 2 FLOPs per multiply-add. Norms, activations and softmax are left out (a few
percent of the time on CPU, far less of the arithmetic). The walk mirrors `UNet2DConditionModel.__init__`:
down blocks, the mid block, up blocks with their skip concatenations.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["unet_flops"]


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
