"""Export validation: each exported graph, run in ONNX Runtime (CPU), against our float32 torch module.

The bound is scale-relative: max |onnx - torch| <= tolerance * max(1, max |torch|), so a VAE decoding to [-1, 1]
and a UNet predicting unit-variance noise share one number. The manifest records the measured max abs diff and
the absolute bound that was applied. Reduced precisions are compared with the float32 module too, because that is
what the package stands in for; bfloat16 graphs are run with their bfloat16 weights and casts widened to float32,
since ONNX Runtime's CPU provider has no bfloat16 Conv/MatMul kernels (so that check covers the graph and the
rounded weights, not bfloat16 arithmetic).
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrt.errors import ExportError
from diffrt.export.onnx import ComponentGraph, make_inputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One validation input and the float32 torch module's outputs for it."""

    sizes: dict[str, int]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


@dataclass(frozen=True)
class Validation:
    max_abs_diff: float
    tolerance: float  # the absolute bound applied: relative tolerance * max(1, max |reference|)

    def manifest(self) -> dict[str, float]:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance}


def reference_cases(graph: ComponentGraph, seed: int = 0) -> list[Case]:
    """Inputs at each of `graph.check_sizes` and the torch module's outputs; call before converting precision."""
    cases = []
    for i, sizes in enumerate(graph.check_sizes):
        tensors = make_inputs(graph.inputs, sizes, seed=seed + i)
        with torch.no_grad():
            outputs = graph.module(*tensors)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        cases.append(Case(
            dict(sizes),
            {spec.name: t.numpy() for spec, t in zip(graph.inputs, tensors)},
            {spec.name: o.float().numpy() for spec, o in zip(graph.outputs, outputs)},
        ))
    return cases


def run_onnx(path: Path, feeds: list[dict[str, np.ndarray]], label: str = "",
             provider: str = "cpu") -> list[dict[str, np.ndarray]]:
    """ONNX Runtime runs of the model at `path` (one session, CPU or CUDA), outputs by name for each feed."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ExportError("validation runs the export in ONNX Runtime: install onnxruntime (the `cpu` extra) or "
                          "pass validate=False (--no-validate)") from error
    if provider == "cuda":
        from diffrt.runtime.engines.onnxruntime_cuda import preload_cuda_libraries

        preload_cuda_libraries()
        # TF32 off: the check compares with float32 torch, and TF32 alone would cost ~1e-3 of it.
        providers: list[Any] = [("CUDAExecutionProvider", {"use_tf32": "0"})]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=providers)
    names = [output.name for output in session.get_outputs()]
    results = []
    for feed in feeds:
        try:
            results.append(dict(zip(names, session.run(names, feed))))
        except Exception as error:  # onnxruntime raises its own Fail / RuntimeException types
            shapes = {name: tuple(array.shape) for name, array in feed.items()}
            first = str(error).strip().splitlines()[0]
            raise ExportError(f"{label or path}: ONNX Runtime cannot run the exported graph on inputs {shapes}: "
                              f"{first}") from error
    return results


def compare(cases: list[Case], actual: list[dict[str, np.ndarray]], tolerance: float) -> Validation:
    """Max abs diff over every case and output, and the scale-relative bound it is held to."""
    diff, scale = 0.0, 1.0
    for case, outputs in zip(cases, actual):
        for name, expected in case.expected.items():
            got = outputs[name]
            if got.shape != expected.shape:
                raise ExportError(f"output `{name}` has shape {got.shape} in ONNX Runtime but {expected.shape} in "
                                  f"torch for input sizes {case.sizes}")
            error = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
            diff = max(diff, error if math.isfinite(error) else math.inf)
            scale = max(scale, float(np.max(np.abs(expected))) if expected.size else 0.0)
    return Validation(diff, tolerance * scale)


def validate_export(graph: ComponentGraph, path: Path, cases: list[Case], tolerance: float,
                    provider: str = "cpu") -> Validation:
    """Run the exported model on every case (ONNX Runtime `provider`, "cpu" or "cuda"); ExportError when the
    difference exceeds the bound."""
    if graph.precision == "bf16":
        with tempfile.TemporaryDirectory(prefix=".validate-", dir=path.parent) as scratch:
            widened = widen_bfloat16(path, Path(scratch))
            actual = run_onnx(widened, [case.inputs for case in cases], graph.name)
    else:
        actual = run_onnx(path, [case.inputs for case in cases], graph.name, provider)
    result = compare(cases, actual, tolerance)
    logger.debug("%s: max abs diff %.3g (bound %.3g)", graph.name, result.max_abs_diff, result.tolerance)
    if not result.max_abs_diff <= result.tolerance:
        raise ExportError(
            f"{graph.name}: ONNX Runtime output differs from the torch module by {result.max_abs_diff:.3g}, above "
            f"the {graph.precision} bound {result.tolerance:.3g} (tolerance {tolerance:g} x output scale); the "
            f"export is wrong or needs a looser `tolerance`"
        )
    return result


def widen_bfloat16(path: Path, folder: Path) -> Path:
    """A copy of the model with every bfloat16 tensor, cast and value widened to float32 (exactly)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph

    def widen(tensor: Any) -> None:
        if tensor.data_type == TensorProto.BFLOAT16:
            array = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))

    for tensor in graph.initializer:
        widen(tensor)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.BFLOAT16:
                attribute.i = TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR:
                widen(attribute.t)
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    out = folder / path.name
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}_data")
    return out
