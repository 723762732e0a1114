"""Reduced-precision export: fp16 / bf16 weights and arithmetic, with float32 islands where reduced precision fails.

The islands, and why:
- GroupNorm runs in float32 (`Float32GroupNorm`). Its variance is a mean of squares over (C/G)*H*W values
  (81,920 per group in SD 1.5's UNet at 512 px, about 1M in the VAE decoder); in float16 the partial sums pass
  65504 and give inf/NaN, and neither ONNX's GroupNormalization nor TensorRT promises float32 accumulation.
- Softmax runs in float32 (`upcast_softmax`): the ONNX `Attention` op gets `softmax_precision = FLOAT`, a bare
  `Softmax` (the MatMul-Softmax-MatMul form TensorRT gets) is wrapped in Casts. The exp-sum over 4096+ tokens
  loses most of float16's 11 mantissa bits otherwise.
- LayerNormalization needs nothing: ONNX computes its statistics in float32 (`stash_type` = 1 by default).
- The SDXL VAE stays float32 when its config says `force_upcast: true` (diffusers' SDXL pipelines upcast it for
  the same reason: the original SDXL VAE overflows float16 inside the decoder). The fp16-fix VAE says false.
- Modules a graph marks with `keep_float32(module, dtypes)` stay float32 when converted to one of `dtypes`: T5's
  feed-forward output projections in float16 (`diffrt.export.t5_encoder` says why). The marked module's caller
  must accept a float32 result (T5 casts its input to the projection's dtype itself).
- Timesteps and SDXL `time_ids` stay float32 inputs: float16 cannot hold fractional timesteps near 1000
  (spacing 0.5) and the sinusoidal embedding is computed in float32 by our UNet anyway.

Inputs and outputs of every component stay float32 (or int64) whatever the precision: the NumPy runtime has no
bfloat16 and refuses lossy float32 -> float16 casts, so the graph converts at its boundary instead.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.errors import invalid

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Validation bound on max |onnx - torch float32| / max(1, max |torch float32|). fp32 only differs by kernel
# arithmetic order; the reduced precisions are compared with the float32 module, so their bound is the format's
# rounding grown through the network: measured about 1e-3 (fp16) and 8e-3 (bf16) on the tiny test models.
DEFAULT_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# Transformers (SD3 / FLUX) sum 20-60 residual blocks without normalising the stream: float16 rounding grows
# further than through a UNet. The tiny FLUX.1-dev test model's fp16 export differs by 1.1% of its output scale,
# while its image stays at 68.7 dB PSNR from the float32 package's (3 steps, 64x96): the UNet bound would refuse it.
COMPONENT_TOLERANCE: dict[tuple[str, str], float] = {("transformer", "fp16"): 3e-2}


def default_tolerance(component: str, precision: str) -> float:
    """The validation bound of `component` exported in `precision` when the caller gives none."""
    return COMPONENT_TOLERANCE.get((component, precision), DEFAULT_TOLERANCE[precision])
# Pipelines that honour the VAE's `force_upcast` (diffusers upcasts the VAE to float32 only in the SDXL family).
FORCE_UPCAST_PIPELINE_MARKER = "XL"
# ONNX TensorProto.FLOAT, for the Attention op's softmax_precision attribute and Cast's `to`.
ONNX_FLOAT = 1
REDUCED_ONNX_TYPES = {"FLOAT16", "BFLOAT16"}
# The attribute `keep_float32` sets on a module: the reduced dtypes in which that module stays float32.
FLOAT32_ISLAND_ATTRIBUTE = "_diffrt_float32_in"


def check_precision(precision: str) -> torch.dtype:
    """The torch dtype of a precision name; InputError naming the allowed values otherwise."""
    if precision not in PRECISIONS:
        raise invalid("precision", f"one of {', '.join(PRECISIONS)}", precision)
    return PRECISIONS[precision]


def component_precision(name: str, precision: str, pipeline_class: str, config: Mapping[str, Any]) -> str:
    """The precision one component is exported in: `precision`, except the float32 islands named above."""
    is_vae = name in ("vae_encoder", "vae_decoder")
    if precision != "fp32" and is_vae and FORCE_UPCAST_PIPELINE_MARKER in pipeline_class and config.get("force_upcast"):
        return "fp32"
    return precision


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics and affine transform run in float32, returning the input's dtype."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        out = F.group_norm(hidden_states.float(), self.num_groups, weight, bias, self.eps)
        return out.to(hidden_states.dtype)


def _float32_group_norm(norm: nn.GroupNorm) -> Float32GroupNorm:
    upcast = Float32GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
    if norm.affine:
        upcast.load_state_dict({key: value.float() for key, value in norm.state_dict().items()})
    return upcast


def keep_float32(module: nn.Module, dtypes: Iterable[torch.dtype]) -> None:
    """Mark `module` (its parameters and buffers) to stay float32 when `convert_module` converts to one of
    `dtypes`: a float32 island chosen by the graph, for a layer whose values overflow or lose too much there."""
    setattr(module, FLOAT32_ISLAND_ATTRIBUTE, frozenset(dtypes))


def convert_module(module: nn.Module, dtype: torch.dtype, float32_group_norm: bool = True) -> nn.Module:
    """`module` in `dtype` (in place), every GroupNorm replaced by a float32 one (unless `float32_group_norm` is
    False) and the modules marked by `keep_float32` for `dtype` left float32; float32 leaves it unchanged."""
    if dtype == torch.float32:
        return module
    _to_dtype_except_islands(module, dtype)
    if not float32_group_norm:
        return module
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                setattr(parent, child_name, _float32_group_norm(child))
    return module


def _to_dtype_except_islands(module: nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype)`, except the parameters and buffers of modules marked float32 for `dtype`: those are never
    converted, so an island keeps the exact float32 weights (a round trip through float16 would round them, and
    turn weights beyond 65504 into inf)."""
    islands = [child for child in module.modules() if dtype in getattr(child, FLOAT32_ISLAND_ATTRIBUTE, ())]
    if not islands:
        module.to(dtype)
        return
    kept = {id(t) for island in islands for t in (*island.parameters(), *island.buffers())}
    for child in module.modules():
        for parameter in child.parameters(recurse=False):
            if id(parameter) not in kept and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
        for name, buffer in list(child.named_buffers(recurse=False)):
            if id(buffer) not in kept and buffer.is_floating_point():
                setattr(child, name, buffer.to(dtype))


class BoundaryCast(nn.Module):
    """Runs `module` in `dtype` behind float32 inputs and outputs; inputs named in `keep_float32` are not cast."""

    def __init__(self, module: nn.Module, input_names: Sequence[str], dtype: torch.dtype, keep_float32: Sequence[str]):
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.cast = [name not in keep_float32 for name in input_names]

    def forward(self, *inputs: torch.Tensor) -> Any:
        cast = [x.to(self.dtype) if c and x.is_floating_point() else x for x, c in zip(inputs, self.cast)]
        outputs = self.module(*cast)
        if isinstance(outputs, tuple):
            return tuple(o.float() if o.is_floating_point() else o for o in outputs)
        return outputs.float() if outputs.is_floating_point() else outputs


def _is_reduced(value: Any) -> bool:
    return value is not None and value.dtype is not None and value.dtype.name in REDUCED_ONNX_TYPES


def upcast_softmax(model: Any) -> int:
    """Make every reduced-precision softmax of an `onnx_ir.Model` run in float32; returns how many were changed."""
    import onnx_ir as ir

    changed = 0
    for node in list(model.graph.all_nodes()):
        if node.domain not in ("", "ai.onnx") or not node.inputs or not _is_reduced(node.inputs[0]):
            continue
        if node.op_type == "Attention":
            node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", ONNX_FLOAT)
            changed += 1
        elif node.op_type == "Softmax":
            _wrap_in_float32(node, ir)
            changed += 1
    return changed


def _wrap_in_float32(node: Any, ir: Any) -> None:
    """Replace `Softmax(x)` by `Cast(Softmax(Cast(x, float32)), original type)`, keeping the output's name."""
    source, output = node.inputs[0], node.outputs[0]
    up = ir.Node("", "Cast", [source], [ir.AttrInt64("to", ONNX_FLOAT)], name=f"{node.name}_upcast")
    softmax = ir.Node("", "Softmax", up.outputs, list(node.attributes.values()), name=f"{node.name}_float32")
    down = ir.Node("", "Cast", softmax.outputs, [ir.AttrInt64("to", int(source.dtype))], name=f"{node.name}_downcast")
    for value, dtype in ((up.outputs[0], ir.DataType.FLOAT), (softmax.outputs[0], ir.DataType.FLOAT)):
        value.dtype, value.shape = dtype, output.shape
    down.outputs[0].dtype, down.outputs[0].shape = output.dtype, output.shape
    node.graph.insert_after(node, [up, softmax, down])
    name = output.name
    output.replace_all_uses_with(down.outputs[0], replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    down.outputs[0].name = name
