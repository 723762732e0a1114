"""torch -> ONNX for each pipeline component: what is exported (module, IO names, dynamic dims) and the export.

Exporter: `torch.onnx.export(..., dynamo=True)`. It is the only torch exporter that emits ONNX's fused `Attention`
op (opset 23; the TorchScript exporter stops at opset 20 and writes MatMul-Softmax-MatMul), and its dynamic shapes
come from `torch.export`, which proves each named dimension really is free in the traced graph (it refines the
constraints itself and fails loudly otherwise) instead of trusting `dynamic_axes` labels on a traced graph.
The price is export time (tens of seconds for a tiny UNet on one CPU core, most of it symbolic-shape work in
the decomposition pass).

IO names are Optimum's (docs/package-format.md), so Optimum's pipelines read our packages and ours read theirs.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, cast

import torch
from torch import nn

from diffrt.errors import ConfigError, invalid
from diffrt.export.precision import PRECISIONS, BoundaryCast, convert_module, upcast_softmax
from diffrt.package.names import CONFIG_NAME, EXTERNAL_DATA_NAME, MODEL_FILE

if TYPE_CHECKING:
    from diffrt.export.models import AutoencoderKL, AutoencoderTiny

logger = logging.getLogger(__name__)

# Opset per target. onnxruntime: 23, where torch's SDPA becomes one ONNX `Attention` node (the text encoders'; UNet,
# VAE and ControlNet attention is ORT's flash `MultiHeadAttention`, see `diffrt.export.attention_op`).
# tensorrt: 18, the opset torch's ONNX function library is written in (lower opsets go through the ONNX version
# converter) and inside the 9..20 range every TensorRT 10.x parser reads; below 23 attention is exported as
# MatMul-Softmax-MatMul, the pattern TensorRT's own MHA fusion matches (its parser only learnt `Attention` in 10.14).
# cuda: ONNX Runtime's CUDA provider with its fused diffusion kernels (`diffrt.export.cuda_target`): opset 18, the
# GroupNorm pattern its fusions match.
TARGET_OPSETS: dict[str, int] = {"onnxruntime": 23, "tensorrt": 18, "cuda": 18}
OPSET_RANGE = (18, 23)  # torch.onnx's dynamo exporter: torchlib opset .. ONNX_MAX_OPSET
# Weights above this go to one external file: a protobuf message cannot exceed 2 GiB, graph included.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
TEXT_LENGTH = 77  # CLIP's position table; every SD text encoder takes exactly 77 tokens
# Named-dimension ranges written to the manifest (inclusive). Latent sides 1..512 are 8..4096 px with SD's VAE.
BATCH_RANGE = (1, 32)
LATENT_RANGE = (1, 512)
SEQUENCE_RANGE = (TEXT_LENGTH, 8 * TEXT_LENGTH)  # UNet context: 1 to 8 concatenated 77-token chunks (long prompts)
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
T5_ENCODER_CLASSES = ("T5EncoderModel",)
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_encoder", "vae_decoder")


@dataclass(frozen=True)
class IOSpec:
    """One graph input or output; `sample` says how validation draws it: (kind, *params)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    sample: tuple[Any, ...] = ("normal", 1.0)

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class ComponentGraph:
    """A component ready to export: `module(*inputs)` returns the outputs in `outputs` order."""

    name: str
    module: nn.Module
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    dims: dict[str, tuple[int, int]]
    trace_sizes: dict[str, int]
    check_sizes: list[dict[str, int]]
    config_file: Path | None = None
    precision: str = "fp32"
    keep_float32: tuple[str, ...] = field(default_factory=tuple)
    #: the Diffusers / transformers model inside `module` whose parameters the manifest's `parameters` map names
    #: (None: no map; adapters do not apply to this component)
    parameter_root: nn.Module | None = None


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    external_data: str | None
    size_bytes: int
    seconds: float
    weight_bytes: int = 0
    parameters: dict[str, list[list[str]]] | None = None


class _OutputsByName(nn.Module):
    """Positional inputs -> keyword call of the wrapped model -> tuple of the named outputs."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model = model
        self.input_names, self.output_names = input_names, output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.input_names, inputs)), output_hidden_states=True, return_dict=True)
        picked = []
        for name in self.output_names:
            if name.startswith("hidden_states."):
                picked.append(result.hidden_states[int(name.split(".")[1])])
            elif name.startswith("normed_hidden_states."):
                # SD clip skip: final_layer_norm of an earlier layer, as Diffusers' encode_prompt computes it.
                norm = cast(nn.LayerNorm, getattr(self.model, "text_model", self.model).final_layer_norm)
                picked.append(norm(result.hidden_states[int(name.split(".")[1])]))
            else:
                picked.append(getattr(result, name))
        return tuple(picked)


class Positional(nn.Module):
    """Positional inputs -> keyword call (the UNet's optional conditioning inputs are passed by name)."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.input_names, inputs)))


def _trace_side(levels: int) -> int:
    """A latent side unit for tracing: 2x and 3x it stay >= 2 and distinct at the deepest of `levels` levels.

    torch.export specializes dimensions of size 0 or 1 to constants, so a trace whose deepest feature map is 1
    pixel high bakes that size into the graph's reshapes; and equal trace sizes may be merged into one symbol.
    """
    return max(4, 2 ** (levels - 1))


def _batch_sizes(extra: dict[str, int] | None = None) -> tuple[dict[str, int], list[dict[str, int]]]:
    trace, checks = {"batch": 2}, [{"batch": 1}, {"batch": 3}]
    for sizes in [trace, *checks]:
        sizes.update(extra or {})
    return trace, checks


def text_encoder_graph(name: str, folder: Path, class_name: str, variant: str | None) -> ComponentGraph:
    """CLIP text encoder: `input_ids` -> `last_hidden_state`, `pooler_output` | `text_embeds`, `hidden_states.N`."""
    if class_name not in TEXT_ENCODER_CLASSES:
        raise invalid(f"{name} class", f"one of {', '.join(TEXT_ENCODER_CLASSES)}", class_name, ConfigError)
    import transformers

    model = getattr(transformers, class_name).from_pretrained(
        str(folder / name), variant=variant, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    config = model.config
    hidden = config.hidden_size
    pooled = ("text_embeds", config.projection_dim) if class_name.endswith("Projection") else ("pooler_output", hidden)
    states = [f"hidden_states.{i}" for i in range(config.num_hidden_layers + 1)]
    ids = ("ids", config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id)
    inputs = [IOSpec("input_ids", "int64", ("batch", TEXT_LENGTH), ids)]
    outputs = [IOSpec("last_hidden_state", "float32", ("batch", TEXT_LENGTH, hidden))]
    outputs += [IOSpec(pooled[0], "float32", ("batch", pooled[1]))]
    outputs += [IOSpec(state, "float32", ("batch", TEXT_LENGTH, hidden)) for state in states]
    if not class_name.endswith("Projection"):  # SD 1.x / 2.x encoders: clip skip needs the normed layers
        normed = [f"normed_hidden_states.{i}" for i in range(1, config.num_hidden_layers)]
        outputs += [IOSpec(state, "float32", ("batch", TEXT_LENGTH, hidden)) for state in normed]
    module = _OutputsByName(model, ["input_ids"], [o.name for o in outputs])
    trace, checks = _batch_sizes()
    return ComponentGraph(name, module, inputs, outputs, {"batch": BATCH_RANGE}, trace, checks,
                          folder / name / CONFIG_NAME, parameter_root=model)


def _text_time_sizes(config: Mapping[str, Any], pooled_dim: int | None, aesthetics: bool) -> tuple[int, int]:
    """SDXL: (pooled text_embeds width, number of time_ids) from the UNet's add-embedding input width."""
    total, per_id = config["projection_class_embeddings_input_dim"], config["addition_time_embed_dim"]
    if pooled_dim is None:
        count = 5 if aesthetics else 6  # refiner: size, crop, aesthetic score; base: size, crop, target size
        pooled_dim = total - count * per_id
    count, remainder = divmod(total - pooled_dim, per_id)
    if remainder or count <= 0:
        raise ConfigError(f"unet `projection_class_embeddings_input_dim` {total} is not the pooled text width "
                          f"{pooled_dim} plus a whole number of `addition_time_embed_dim` ({per_id}) time ids")
    return pooled_dim, count


def unet_graph(folder: Path, variant: str | None, pooled_dim: int | None, aesthetics: bool) -> ComponentGraph:
    """UNet: sample, timestep, encoder_hidden_states [, text_embeds, time_ids] [, timestep_cond] -> out_sample."""
    from diffrt.export.models import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant=variant, dtype=torch.float32)
    config = unet.config
    cross = config["cross_attention_dim"]
    context_dim = max(cross) if isinstance(cross, list) else cross
    latent = ("batch", config["in_channels"], "height", "width")
    inputs = [
        IOSpec("sample", "float32", latent),
        IOSpec("timestep", "float32", ("batch",), ("uniform", 0.0, 999.0)),
        IOSpec("encoder_hidden_states", "float32", ("batch", "sequence", context_dim)),
    ]
    if config["addition_embed_type"] == "text_time":
        pooled, count = _text_time_sizes(config, pooled_dim, aesthetics)
        inputs += [IOSpec("text_embeds", "float32", ("batch", pooled)),
                   IOSpec("time_ids", "float32", ("batch", count), ("uniform", 0.0, 1024.0))]
    if config["time_cond_proj_dim"] is not None:
        inputs.append(IOSpec("timestep_cond", "float32", ("batch", config["time_cond_proj_dim"])))
    outputs = [IOSpec("out_sample", "float32", ("batch", config["out_channels"], "height", "width"))]
    names = [spec.name for spec in inputs]
    dims, trace, checks = unet_sizes(len(config["block_out_channels"]))
    return ComponentGraph("unet", Positional(unet, names), inputs, outputs, dims, trace, checks,
                          folder / "unet" / CONFIG_NAME, keep_float32=("timestep", "time_ids"), parameter_root=unet)


def unet_sizes(levels: int) -> tuple[dict[str, tuple[int, int]], dict[str, int], list[dict[str, int]]]:
    """Dim ranges, trace sizes and check sizes of a UNet (or ControlNet) with `levels` resolution levels."""
    dims = {"batch": BATCH_RANGE, "height": LATENT_RANGE, "width": LATENT_RANGE, "sequence": SEQUENCE_RANGE}
    side = _trace_side(levels)
    trace = {"batch": 2, "height": 2 * side, "width": 3 * side, "sequence": TEXT_LENGTH}
    # 8x8 takes SD's deepest level down to 1x1, 16x8 to 2x1: sizes the trace never saw.
    checks = [{"batch": 1, "height": 8, "width": 8, "sequence": TEXT_LENGTH},
              {"batch": 3, "height": 16, "width": 8, "sequence": 2 * TEXT_LENGTH}]
    return dims, trace, checks


def vae_graph(name: str, folder: Path, variant: str | None) -> ComponentGraph:
    """vae_encoder: sample -> latent_parameters; vae_decoder: latent_sample -> sample (unscaled latents)."""
    from diffrt.export.models import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", variant=variant, dtype=torch.float32)
    return autoencoder_graph(name, vae, folder / "vae" / CONFIG_NAME)


def autoencoder_graph(name: str, vae: AutoencoderKL | AutoencoderTiny, config_file: Path | None) -> ComponentGraph:
    """A loaded AutoencoderKL or AutoencoderTiny as `name` (vae_encoder[_tiny] / vae_decoder[_tiny]).

    The tiny encoder (TAESD) outputs the latents themselves, named `latents`: there is no distribution to sample.
    """
    from diffrt.export.models import VaeDecoderForExport, VaeEncoderForExport

    config = vae.config
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    latent, image = config["latent_channels"], config["in_channels"]
    pixels = ("batch", image, "height", "width")
    dims = {"batch": BATCH_RANGE, "latent_height": LATENT_RANGE, "latent_width": LATENT_RANGE,
            "height": (factor * LATENT_RANGE[0], factor * LATENT_RANGE[1]),
            "width": (factor * LATENT_RANGE[0], factor * LATENT_RANGE[1])}
    if name.startswith("vae_encoder"):
        module: nn.Module = VaeEncoderForExport(vae)
        inputs = [IOSpec("sample", "float32", pixels, ("uniform", -1.0, 1.0))]
        output = ("latents", latent) if name.endswith("_tiny") else ("latent_parameters", 2 * latent)
        outputs = [IOSpec(output[0], "float32", ("batch", output[1], "latent_height", "latent_width"))]
        keys = ("height", "width")
        scale = factor
    else:
        module = VaeDecoderForExport(vae)
        # Unscaled latents: a unit-variance diffusion latent divided by scaling_factor (about 5.5 for SD).
        spread = 1.0 / float(config.get("scaling_factor") or 1.0)
        inputs = [IOSpec("latent_sample", "float32", ("batch", latent, "latent_height", "latent_width"),
                         ("normal", spread))]
        outputs = [IOSpec("sample", "float32", pixels)]
        keys = ("latent_height", "latent_width")
        scale = 1
    side = _trace_side(len(config["block_out_channels"])) * scale
    trace = {"batch": 2, keys[0]: 2 * side, keys[1]: 3 * side}
    checks = [{"batch": 1, keys[0]: 8 * scale, keys[1]: 8 * scale},
              {"batch": 2, keys[0]: 4 * scale, keys[1]: 12 * scale}]
    module = Positional(module, [spec.name for spec in inputs])
    return ComponentGraph(name, module, inputs, outputs, dims, trace, checks, config_file)


def make_inputs(specs: list[IOSpec], sizes: Mapping[str, int], seed: int = 0) -> list[torch.Tensor]:
    """Random inputs for `specs` at the named `sizes`, drawn as each spec's `sample` says (float32 / int64)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
        kind, *params = spec.sample
        if kind == "ids":
            vocab, bos, eos, pad = params
            tensors.append(_token_ids(shape, vocab, bos, eos, pad, generator=generator))
        elif kind == "uniform":
            low, high = params
            tensors.append(torch.rand(shape, generator=generator) * (high - low) + low)
        else:
            tensors.append(torch.randn(shape, generator=generator) * params[0])
    return tensors


def _token_ids(shape: list[int], vocab: int, bos: int | None, eos: int, pad: int | None,
               generator: torch.Generator) -> torch.Tensor:
    """What a CLIP tokenizer gives: start token, words, end token at a different place per row, then padding."""
    batch, length = shape
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    ids[ids == eos] = 0  # the end token appears once per row, as from a tokenizer
    for row in range(batch):
        end = 3 + (7 * row) % (length - 4)
        if bos is not None:
            ids[row, 0] = bos
        ids[row, end] = eos
        ids[row, end + 1:] = eos if pad is None else pad
    return ids


def prepare_for_export(graph: ComponentGraph, precision: str, float32_group_norm: bool = True) -> None:
    """Convert `graph.module` in place to `precision` (float32 islands kept) behind float32 inputs/outputs.

    `float32_group_norm=False` leaves GroupNorm in `precision`: for graphs whose GroupNorms become ONNX Runtime's
    fused kernel (the cuda target), which keeps its statistics in float32 itself."""
    graph.precision = precision
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:
        convert_module(graph.module, dtype, float32_group_norm)
        graph.module = BoundaryCast(graph.module, [s.name for s in graph.inputs], dtype, graph.keep_float32)


def export_graph(graph: ComponentGraph, folder: Path, opset: int,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                 translations: Mapping[Any, Any] | None = None, map_parameters: bool = True) -> ExportedFile:
    """Export `graph` to `folder/model.onnx` (+ `model.onnx_data` when the weights exceed the threshold).

    `translations`: ONNX translations of our custom torch ops (the cuda target's MultiHeadAttention).
    `map_parameters`: locate `graph.parameter_root`'s parameters among the initializers (`ExportedFile.parameters`;
    off for a graph that is rewritten after export, whose initializers the map would not name)."""
    import onnx_ir as ir

    start = time.perf_counter()
    args = tuple(make_inputs(graph.inputs, graph.trace_sizes))
    dynamic = tuple({axis: d for axis, d in enumerate(spec.shape) if isinstance(d, str)} for spec in graph.inputs)
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph.module.eval(), args, dynamo=True, opset_version=opset, verbose=False, optimize=True,
            input_names=[s.name for s in graph.inputs], output_names=[s.name for s in graph.outputs],
            dynamic_shapes={"inputs": dynamic},  # every module here takes `*inputs`
            custom_translation_table=dict(translations) if translations else None,
        )
    assert program is not None  # torch.onnx.export returns an ONNXProgram whenever dynamo=True
    model = program.model
    if graph.precision != "fp32":
        upcast_softmax(model)
    _name_output_dims(model, graph.outputs, ir)
    parameters = None
    if map_parameters and graph.parameter_root is not None:
        from diffrt.export.parameter_map import parameter_map

        parameters = parameter_map(graph.name, graph.parameter_root, model.graph.initializers)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    external = EXTERNAL_DATA_NAME if weights > external_data_threshold else None
    # Same layout as onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True), but streamed from
    # the torch tensors: onnx.save_model first builds a ModelProto holding a second copy of every weight.
    ir.save(model, path, external_data=external)
    size = path.stat().st_size + ((folder / external).stat().st_size if external else 0)
    return ExportedFile(path, external, size, time.perf_counter() - start, weights, parameters)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's per-initializer INFO lines and its optional-dependency notices for one export."""
    levels = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING, "torch.onnx": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    try:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(max(level, logging.getLogger(name).getEffectiveLevel()))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            warnings.filterwarnings("ignore", message=".*treespec.*", category=FutureWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _name_output_dims(model: Any, outputs: list[IOSpec], ir: Any) -> None:
    """torch.export names output sizes by expression ("8*latent_height"); give them the manifest's names."""
    for value, spec in zip(model.graph.outputs, outputs):
        value.shape = ir.Shape(list(spec.shape))

