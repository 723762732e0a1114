"""T5 text encoder (SD3's `text_encoder_3`, FLUX's `text_encoder_2`): `input_ids` -> `last_hidden_state`.

transformers' `T5EncoderModel` as Diffusers calls it in `_get_t5_prompt_embeds`: ids only, no attention mask (the
padding is part of what the transformer was trained on), `[0]` of the output. IO names are Optimum's.

Sequence: dynamic, 1..512 tokens. Diffusers pads the T5 ids to `max_sequence_length` (SD3 256, FLUX 512 by default,
schnell users 256) and refuses more than 512; T5's relative position buckets accept any length, so one graph
serves every length in the range (the minimum, 1, is a lone end token).

fp16: the feed-forward output projections (`DenseReluDense.wo`) stay float32. T5 v1.1 (the XXL encoder of SD3 and
FLUX) grows activations past float16's 65504 in the feed-forward output and the residual stream after it: run
entirely in float16 it gives inf/NaN. transformers declares the same island (`_keep_in_fp32_modules = ["wo"]`,
float16 only) and its T5 casts the projection's input to the projection's dtype itself; the float32 result then
promotes the residual stream to float32, as in transformers' own fp16 T5. bfloat16 has float32's range, so bf16
keeps no island (transformers neither: `_keep_in_fp32_modules_strict` is empty for T5).

The RMS layer norms run in float32 in both reduced precisions (input cast up, float32 weight, output cast to the
model's dtype), written as x / sqrt(mean(x^2) + eps). transformers' T5LayerNorm computes its statistics in float32
too but multiplies by its weight in the reduced dtype; exported, the RMSNormalization fusion of the ONNX exporter
(onnxscript) then absorbs the float32 cast of a float16 input and builds a node with float16 X and float32 scale
that ONNX Runtime rejects ("Mul bound to different types"). The Div form is not fused: a few more nodes per norm,
nothing next to T5's matmuls. fp32 exports keep transformers' forward (and the fused RMSNormalization).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.onnx import BATCH_RANGE, ComponentGraph, IOSpec
from diffrt.export.precision import keep_float32
from diffrt.package.files import read_json
from diffrt.package.names import CONFIG_NAME

#: inclusive range of the `sequence` dimension (Diffusers' `max_sequence_length` limit for SD3 and FLUX is 512)
T5_SEQUENCE_RANGE = (1, 512)
# Trace and check sizes: sequence >= 5 (the "ids" sample puts words, the end token, then padding) and distinct
# from the batch sizes, so torch.export keeps the two dimensions apart. 256 is SD3's default length.
TRACE_SIZES = {"batch": 2, "sequence": 13}
CHECK_SIZES = [{"batch": 1, "sequence": 256}, {"batch": 3, "sequence": 7}]
T5_MODEL_TYPES = ("t5", "umt5")
RMS_NORM_CLASSES = ("T5LayerNorm", "UMT5LayerNorm")
REDUCED_DTYPES = (torch.float16, torch.bfloat16)


class _LastHiddenState(nn.Module):
    """`input_ids` -> the encoder's last hidden state; `*inputs`, the signature `export_graph` traces."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs[0], return_dict=True).last_hidden_state


def t5_encoder_graph(name: str, folder: Path, variant: str | None) -> ComponentGraph:
    """The T5 encoder in `folder / name`, ready for `export_component`; its `wo` layers are fp16 float32 islands."""
    config_file = folder / name / CONFIG_NAME
    model_type = read_json(config_file, required=True, error=ConfigError).get("model_type")
    if model_type not in T5_MODEL_TYPES:
        raise invalid(f"{name} model_type", f"one of {', '.join(T5_MODEL_TYPES)} (a T5 encoder)", model_type,
                      ConfigError)
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(
        str(folder / name), variant=variant, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    mark_float32_islands(model)
    float32_rms_norms(model)
    config = model.config
    ids = ("ids", config.vocab_size, None, config.eos_token_id, config.pad_token_id)
    inputs = [IOSpec("input_ids", "int64", ("batch", "sequence"), ids)]
    outputs = [IOSpec("last_hidden_state", "float32", ("batch", "sequence", config.d_model))]
    dims = {"batch": BATCH_RANGE, "sequence": T5_SEQUENCE_RANGE}
    checks = [dict(sizes) for sizes in CHECK_SIZES]
    return ComponentGraph(name, _LastHiddenState(model), inputs, outputs, dims, dict(TRACE_SIZES), checks,
                          config_file, parameter_root=model)


def mark_float32_islands(model: nn.Module) -> list[str]:
    """Mark the modules the model class keeps float32 in float16 (T5: every `wo`); returns their names."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    marked = []
    for module_name, module in model.named_modules():
        if module_name.rpartition(".")[2] in names:
            keep_float32(module, (torch.float16,))
            marked.append(module_name)
    return marked


class _Float32RMSNorm:
    """A T5 RMS norm's forward in float32 whatever the model's dtype, returning the dtype of `reference` (a weight
    of the model, read per call: it follows `convert_module`). In float32 it is transformers' own forward."""

    def __init__(self, norm: nn.Module, reference: torch.Tensor):
        self.original = norm.forward
        self.weight = cast(torch.Tensor, norm.weight)  # the same Parameter object after any conversion
        self.epsilon = float(cast(float, norm.variance_epsilon))
        self.reference = reference

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self.reference.dtype
        if dtype == torch.float32:
            return cast(torch.Tensor, self.original(hidden_states))
        x = hidden_states.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        # x / sqrt, not x * rsqrt: the exporter's RMSNormalization fusion would absorb the float32 cast of a
        # float16 input and build a node with float16 X and float32 scale, which ONNX Runtime rejects.
        return (self.weight * (x / torch.sqrt(variance + self.epsilon))).to(dtype)


def float32_rms_norms(model: nn.Module) -> int:
    """Make every T5 RMS norm compute in float32 in reduced precision and return the model's dtype (parameter
    names unchanged); returns how many norms were changed."""
    reference = cast(torch.Tensor, cast(Any, model).get_input_embeddings().weight)
    changed = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORM_CLASSES:
            keep_float32(module, REDUCED_DTYPES)
            module.forward = _Float32RMSNorm(module, reference)
            changed += 1
    return changed
