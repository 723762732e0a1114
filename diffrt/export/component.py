"""Export one component (torch module -> ONNX -> checks) under the export options: what `export_pipeline` and the
tiny-VAE export (`diffrt.export.taesd`) share."""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from diffrt.errors import invalid
from diffrt.export import cuda_target
from diffrt.export.attention_op import translation_table, uses_multi_head_attention
from diffrt.export.models.attention import lower_to_multi_head_attention
from diffrt.export.onnx import (
    COMPONENTS,
    EXTERNAL_DATA_THRESHOLD,
    OPSET_RANGE,
    TARGET_OPSETS,
    ComponentGraph,
    export_graph,
    prepare_for_export,
)
from diffrt.export.precision import check_precision, default_tolerance
from diffrt.export.validate import reference_cases, validate_export
from diffrt.package.files import copy_file
from diffrt.package.names import CONFIG_NAME, MODEL_FILE
from diffrt.package.writer import component_entry

logger = logging.getLogger(__name__)

BF16_MIN_OPSET = 22  # ONNX Conv (and InstanceNormalization) accept bfloat16 from opset 22
#: (component, file bytes, export seconds, max abs diff or None) per exported component
Rows = list[tuple[str, int, float, float | None]]


@dataclass(frozen=True)
class Options:
    precision: str
    target: str
    opset: int
    components: tuple[str, ...] | None
    validate: bool
    tolerance: float | None
    external_data_threshold: int


def check_options(precision: str = "fp32", target: str = "onnxruntime", opset: int | None = None,
                  components: Sequence[str] | None = None, validate: bool = True, tolerance: float | None = None,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Options:
    """Validate the export arguments that need no source; InputError naming the first bad one."""
    check_precision(precision)
    if target not in TARGET_OPSETS:
        raise invalid("target", f"one of {', '.join(TARGET_OPSETS)}", target)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]):
        raise invalid("opset", f"None or an int in [{OPSET_RANGE[0]}, {OPSET_RANGE[1]}]", opset)
    chosen = TARGET_OPSETS[target] if opset is None else opset
    if target == "cuda" and chosen != TARGET_OPSETS["cuda"]:
        raise invalid("opset", f"{TARGET_OPSETS['cuda']} (or None) with target cuda, whose GroupNorm fusion reads the "
                      "opset-18 form", opset)
    if target == "cuda" and precision == "bf16":
        raise invalid("precision", "fp32 or fp16 with target cuda (its GroupNorm kernel takes float32 or float16)",
                      precision)
    if precision == "bf16" and chosen < BF16_MIN_OPSET:
        raise invalid("opset", f">= {BF16_MIN_OPSET} for precision bf16 (ONNX Conv takes bfloat16 from opset "
                      f"{BF16_MIN_OPSET}; target {target} defaults to {TARGET_OPSETS[target]})", chosen)
    if components is not None:
        if isinstance(components, str) or not all(isinstance(c, str) for c in components) or not components:
            raise invalid("components", f"None or a non-empty list of {', '.join(COMPONENTS)}", components)
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown:
            raise invalid("components", f"names from {', '.join(COMPONENTS)}", unknown[0])
        components = tuple(dict.fromkeys(components))
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not math.isfinite(tolerance) or tolerance <= 0):
        raise invalid("tolerance", "None or a positive number (relative to the output scale)", tolerance)
    if not isinstance(validate, bool):
        raise invalid("validate", "True or False", validate)
    if isinstance(external_data_threshold, bool) or not isinstance(external_data_threshold, int) \
            or external_data_threshold < 0:
        raise invalid("external_data_threshold", "an int >= 0 (bytes)", external_data_threshold)
    return Options(precision, target, chosen, components, validate, tolerance, external_data_threshold)


def export_component(graph: ComponentGraph, precision: str, folder: Path, options: Options,
                     rows: Rows) -> dict[str, Any]:
    """Export and validate a loaded component into `folder / graph.name`; appends its summary row."""
    name = graph.name
    cases = reference_cases(graph) if options.validate else []
    fused = options.target == "cuda" and name in cuda_target.FUSED_COMPONENTS
    opset, translations = options.opset, None
    if uses_multi_head_attention(options.target, precision) and lower_to_multi_head_attention(graph.module):
        translations = translation_table()
    prepare_for_export(graph, precision, float32_group_norm=not fused)
    # A graph to fuse is written with every weight external: the fusions then run on the graph alone.
    threshold = 0 if fused else options.external_data_threshold
    exported = export_graph(graph, folder / name, opset, threshold, translations, map_parameters=not fused)
    graph.module = None  # type: ignore[assignment]  # free the weights before ONNX Runtime loads its copy
    graph.parameter_root = None
    gc.collect()
    if fused:
        external = exported.weight_bytes > options.external_data_threshold
        data = cuda_target.fuse(exported.path, name, external)
        size = sum(f.stat().st_size for f in (exported.path, folder / name / (data or MODEL_FILE)))
        exported = replace(exported, external_data=data, size_bytes=size if data else exported.path.stat().st_size)
    if graph.config_file is not None:
        copy_file(graph.config_file, folder / name / CONFIG_NAME)
    validation = None
    if options.validate and fused and not cuda_usable_here():
        logger.warning("%s: not validated: its fused CUDA kernels run on a GPU only, and there is none here "
                       "(the manifest records validation null)", name)
    elif options.validate:
        tolerance = options.tolerance if options.tolerance is not None else default_tolerance(name, precision)
        provider = "cuda" if options.target == "cuda" and cuda_usable_here() else "cpu"
        validation = validate_export(graph, exported.path, cases, tolerance, provider)
    rows.append((name, exported.size_bytes, exported.seconds, validation.max_abs_diff if validation else None))
    return component_entry(
        file=f"{name}/{MODEL_FILE}", external_data=exported.external_data, precision=precision, opset=opset,
        inputs=[s.manifest() for s in graph.inputs], outputs=[s.manifest() for s in graph.outputs],
        dims=graph.dims, validation=validation.manifest() if validation else None, parameters=exported.parameters,
    )


def cuda_usable_here() -> bool:
    """ONNX Runtime with the CUDA provider and a GPU: validation of the cuda target can run."""
    try:
        from diffrt.runtime.engines.onnxruntime_cuda import cuda_usable
    except ImportError:  # no onnxruntime at all: validation says so itself
        return False
    return cuda_usable()


def summary_table(rows: Rows) -> str:
    """(component, file bytes, export seconds, max abs diff) rows as an aligned text table."""
    lines = [f"{'component':<16}{'size':>12}{'export s':>10}{'max abs diff':>14}"]
    for name, size, seconds, diff in rows:
        shown = "-" if diff is None else f"{diff:.3g}"
        lines.append(f"{name:<16}{_size(size):>12}{seconds:>10.1f}{shown:>14}")
    return "\n".join(lines)


def _size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
