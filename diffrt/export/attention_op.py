"""UNet / VAE / ControlNet attention written as ONNX Runtime's `com.microsoft.MultiHeadAttention`.

The standard opset-23 `Attention` node is one node, but ONNX Runtime's CPU kernel for it materialises the whole
[batch, heads, queries, keys] score matrix: 2 x 8 x 4096 x 4096 float32 is 1 GiB at each SD 1.5 64x64 self-attention,
and the softmax adds another; the UNet's working memory then peaks at ~2 GiB, more than Diffusers' whole activation
budget. ORT's CPU `MultiHeadAttention` runs flash attention (tiled, online softmax): measured on one such attention,
peak 0.16 GiB instead of 2.21 and 0.22 s instead of 0.29 (docs/benchmarks.md). OpenVINO reads both forms as its own
SDPA (same time and memory), ONNX Runtime's CUDA provider runs the contrib op with its flash kernels, so the
portable `onnxruntime` target and the `cuda` target both use it. The op has no bfloat16 CPU kernel: bf16 packages
keep the standard node. TensorRT's parser does not know contrib ops: its target keeps MatMul-Softmax-MatMul.
Text encoders (CLIP's causal mask) are not our modules and keep their standard attention.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

#: the export precisions whose attention becomes MultiHeadAttention, per target
MULTI_HEAD_ATTENTION_PRECISIONS: dict[str, tuple[str, ...]] = {"onnxruntime": ("fp32", "fp16"),
                                                               "cuda": ("fp32", "fp16")}


def uses_multi_head_attention(target: str, precision: str) -> bool:
    """Whether a component exported for `target` in `precision` writes its attention as MultiHeadAttention."""
    return precision in MULTI_HEAD_ATTENTION_PRECISIONS.get(target, ())


@functools.lru_cache(maxsize=1)
def _register_schemas() -> None:
    """onnxscript builds nodes from registered schemas; ORT's contrib op has none in the onnx package."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MultiHeadAttention", "com.microsoft"):
        return
    tensor = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[tensor("query", "T"), tensor("key", "T"), tensor("value", "T")],
        outputs=[tensor("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "attention input type")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of attention heads")],
    ))


def translation_table() -> dict[Any, Any]:
    """torch op -> ONNX translation for `torch.onnx.export(custom_translation_table=...)`."""
    import onnxscript

    from diffrt.export.models.attention import multi_head_attention  # noqa: F401  (registers the torch op)

    _register_schemas()
    microsoft = onnxscript.values.Opset("com.microsoft", 1)

    def multi_head_attention_onnx(query: Any, key: Any, value: Any, num_heads: int) -> Any:
        return microsoft.MultiHeadAttention(query, key, value, num_heads=num_heads)

    return {torch.ops.diffrt.multi_head_attention.default: multi_head_attention_onnx}
