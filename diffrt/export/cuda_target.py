"""The `cuda` export target: UNet and VAE graphs built from ONNX Runtime's own CUDA diffusion kernels.

What changes against the portable `onnxruntime` target, and why (each one a kernel ORT's CUDA provider has and its
standard-operator graph does not reach):
- Attention is one `com.microsoft.MultiHeadAttention` per block on [batch, tokens, heads*dim] projections (flash
  attention on Ampere/Hopper, float32 accumulation), with no head split/merge transposes around it.
- ORT's transformer optimizer (`onnxruntime.transformers`, model types "unet" / "vae", the recipe of ORT's own
  Stable Diffusion pipeline) fuses GroupNorm (+ SiLU) into its NHWC `GroupNorm` kernel (two passes instead of
  ONNX GroupNormalization's ~10 float32 kernels), residual adds into `SkipGroupNorm` / `SkipLayerNormalization`,
  convolutions into `NhwcConv` (Tensor Cores' layout) and GEGLU into `BiasSplitGelu`.
- float16 comes from torch, as for the other targets, except that GroupNorm is not kept in a float32 island: the
  fused kernel takes float16 activations and keeps its statistics in float32 itself (an InstanceNormalization left
  unfused would not, so the export refuses one). Inputs/outputs and the timestep embedding stay float32.
Text encoders are exported with standard operators at opset 18 (attention as MatMul-Softmax-MatMul with a float32
softmax): they run once per image, and the first H200 run left open whether ONNX Runtime 1.31's CUDA kernel for the
opset-23 `Attention` op treats CLIP's causal mask as the CPU does (docs/benchmarks.md), so this target does not
depend on it.
The fused operators have CUDA kernels only: a package of this target runs with provider "cuda" alone, and its
graphs are validated on CUDA where a GPU is present (elsewhere the export says it could not check them).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from diffrt.errors import ExportError
from diffrt.package.names import EXTERNAL_DATA_NAME

logger = logging.getLogger(__name__)

FUSED_COMPONENTS = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}
FUSED_OPSET = 18  # torch writes GroupNorm as the InstanceNormalization pattern ORT's GroupNorm fusion matches
# Left unfused in a float16 graph, these would compute GroupNorm's statistics or a softmax in float16.
UNFUSED_OPS = {"InstanceNormalization", "GroupNormalization", "Softmax"}


def fuse(path: Path, name: str, external: bool) -> str | None:
    """Rewrite the exported graph at `path` (its weights in the external file `EXTERNAL_DATA_NAME` beside it) with
    ORT's fusions; returns the external data file name of the result, or None when `external` is False (weights
    inline).

    Memory: ORT's optimizer holds a model as protobuf; run on a loaded 3.4 GB float32 SD 1.5 UNet, it and ORT's
    float16 converter peaked at 19 GB. So torch writes the graph in its final precision with every weight external,
    the fusions run on the graph alone (the few tensors one rewrites, such as NhwcConv's transposed kernels, are
    read from the data file when touched), and the weights are then copied to the new data file one tensor at a
    time.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = FUSED_COMPONENTS[name]
    options = FusionOptions(model_type)
    options.enable_attention = False  # attention is a MultiHeadAttention node already
    model = onnx.load(str(path), load_external_data=False)
    before = len(model.graph.node)
    with _working_directory(path.parent), _float_initializers_from_float16_constants():
        optimizer = optimize_model(model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=options, use_gpu=True, only_onnxruntime=False)
        optimizer.topological_sort()
    model = optimizer.model
    unfused = sorted({node.op_type for node in model.graph.node if node.op_type in UNFUSED_OPS})
    if unfused:
        raise ExportError(f"{name}: ONNX Runtime's fusions left {', '.join(unfused)} in the cuda target's graph (a "
                          "pattern they do not know); export this model with --target onnxruntime")
    check_group_norms(model, name)
    fused = sum(1 for node in model.graph.node if node.domain == "com.microsoft")
    logger.info("%s: ORT CUDA fusions: %d nodes -> %d (%d com.microsoft kernels)", name, before,
                len(model.graph.node), fused)
    return _write(model, path, external)


def check_group_norms(model: Any, name: str) -> None:
    """ExportError for a GroupNorm ORT's CUDA kernel refuses at run time: it handles an even number of channels per
    group, at most 512 (`GroupNormNHWCParams`: two channels per thread, blocks of up to 512 channels). Every SD,
    SD 2 and SDXL model qualifies (320/32 = 10, 128/32 = 4, ...)."""
    widths = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("GroupNorm", "SkipGroupNorm") or node.domain != "com.microsoft":
            continue
        groups = next(attr.i for attr in node.attribute if attr.name == "groups")
        channels = widths[node.input[1]][0]
        per_group = channels // groups
        if per_group % 2 or per_group > 512:
            raise ExportError(
                f"{name}: a GroupNorm of {channels} channels in {groups} groups ({per_group} per group) is beyond "
                "ONNX Runtime's CUDA kernel (an even number of channels per group, at most 512); export this model "
                "with --target onnxruntime")


def _write(model: Any, path: Path, external: bool) -> str | None:
    """Write `model` over `path`, its weights read from the exported data file one tensor at a time: into a new
    data file of the same name (tensors of 1 KiB and more, 4 KiB-aligned so ONNX Runtime can map them), or inline.
    In place: the package is built in a temporary folder that only a finished export renames into place."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

    source_path = path.parent / EXTERNAL_DATA_NAME
    target_path = path.parent / f".{EXTERNAL_DATA_NAME}.fused"
    with open(source_path, "rb") as source, open(target_path, "wb") as target:
        for tensor in model.graph.initializer:
            data = tensor.raw_data
            if uses_external_data(tensor):
                if not data:  # a fusion that read this tensor loaded it already
                    info = ExternalDataInfo(tensor)
                    source.seek(info.offset or 0)
                    data = source.read(info.length) if info.length else source.read()
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
            if not external or len(data) < 1024:
                tensor.raw_data = data
                continue
            target.seek(-target.tell() % 4096, os.SEEK_CUR)
            offset = target.tell()
            target.write(data)
            tensor.raw_data = data  # set_external_data wants the raw_data field present, then it can go
            set_external_data(tensor, EXTERNAL_DATA_NAME, offset, len(data))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
    onnx.save_model(model, str(path))
    if external:
        target_path.replace(source_path)
        return EXTERNAL_DATA_NAME
    target_path.unlink()
    source_path.unlink()
    return None


@contextlib.contextmanager
def _float_initializers_from_float16_constants() -> Iterator[None]:
    """ORT's GroupNorm fusion declares the fused kernel's gamma/beta FLOAT (its CUDA kernel takes them so) but
    writes the bytes of the graph's own constants, which are float16 in a float16 graph (ORT's own recipe fuses in
    float32 and converts afterwards, at several times the memory). For the fusion's duration a FLOAT initializer
    made from a float16 array is widened first."""
    import importlib

    import numpy as np
    import onnx

    importlib.import_module("onnxruntime.transformers.optimizer")
    # onnxruntime.transformers puts its folder on sys.path and its fusions import `fusion_base` as a top-level module.
    fusion = importlib.import_module("fusion_base").Fusion
    original = fusion.add_initializer

    def add_initializer(self: Any, name: str, data_type: int, dims: Any, vals: Any, raw: bool = True) -> Any:
        if data_type == onnx.TensorProto.FLOAT and isinstance(vals, np.ndarray) and vals.dtype == np.float16:
            vals = vals.astype(np.float32)
        return original(self, name, data_type, dims, vals, raw)

    fusion.add_initializer = add_initializer
    try:
        yield
    finally:
        fusion.add_initializer = original


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
