"""`export_pipeline`: a diffusers checkpoint (folder, Hub id or single file) -> a model package (ONNX + manifest).

It checks every argument first (nothing is loaded or written for a bad one), resolves the source,
then exports each component in turn (load our torch module -> torch.onnx -> ONNX Runtime check), writing into a
temporary folder beside the output that is renamed into place only when everything succeeded.
"""
from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from diffrt.errors import ConfigError, ExportError, InputError, invalid
from diffrt.export.onnx import (
    COMPONENTS, EXTERNAL_DATA_THRESHOLD, MODEL_NAME, OPSET_RANGE, TARGET_OPSETS, TEXT_ENCODER_CLASSES, ComponentGraph,
    export_graph, prepare_for_export, text_encoder_graph, unet_graph, vae_graph,
)
from diffrt.export.package import (
    INDEX_NAME, MANIFEST_NAME, PackageWriter, build_manifest, check_output, component_entry, copy_file, model_index,
    summary_table, write_json,
)
from diffrt.export import cuda_target
from diffrt.export.precision import DEFAULT_TOLERANCE, check_precision, component_precision
from diffrt.export.tokenizers import write_tokenizer
from diffrt.export.validate import reference_cases, validate_export

__all__ = ["export_pipeline", "COMPONENTS", "TARGET_OPSETS"]

logger = logging.getLogger(__name__)

BF16_MIN_OPSET = 22  # ONNX Conv (and InstanceNormalization) accept bfloat16 from opset 22
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
WEIGHTS_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "unet": "unet",
              "vae_encoder": "vae", "vae_decoder": "vae"}
EXPORTER_DISTRIBUTIONS = {"torch": ("torch",), "onnx": ("onnx",), "onnxscript": ("onnxscript",),
                          "transformers": ("transformers",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}
SOURCE_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
                  "text_encoder": TEXT_ENCODER_CLASSES, "text_encoder_2": TEXT_ENCODER_CLASSES}


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


def export_pipeline(source: str | Path, output: str | Path, *, revision: str | None = None,
                    variant: str | None = None, precision: str = "fp32", target: str = "onnxruntime",
                    opset: int | None = None, components: Sequence[str] | None = None, overwrite: bool = False,
                    validate: bool = True, tolerance: float | None = None, token: str | bool | None = None,
                    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                    tiny_vae: str | Path | None = None) -> Path:
    """Export the checkpoint `source` to the model package folder `output`; returns `output`.

    `precision` fp32 | fp16 | bf16 (float32 islands kept, see `diffrt.export.precision`); `target` onnxruntime
    (opset 23, fused Attention) | tensorrt (opset 18); `components` a subset of text_encoder, text_encoder_2, unet,
    vae_encoder, vae_decoder (default: all the checkpoint has); `tolerance` overrides the validation bound
    (relative to the output scale; defaults per precision in `DEFAULT_TOLERANCE`). `tiny_vae`, an AutoencoderTiny
    (TAESD) folder or Hub repo id, adds `vae_decoder_tiny` (+ `vae_encoder_tiny` with a vae_encoder); see
    `diffrt.export.tiny_vae`.
    """
    # tiny_vae builds on this module (Options, export_component): imported here, not at the top (a cycle).
    from diffrt.export.tiny_vae import check_fits, export_tiny_components, resolve_tiny_vae, tiny_names

    options = check_options(precision, target, opset, components, validate, tolerance, external_data_threshold)
    output = Path(output)
    check_output(output, overwrite)
    # The tiny VAE first: its files are small, so a wrong one fails before a large checkpoint download.
    tiny = resolve_tiny_vae(tiny_vae, token=token) if tiny_vae is not None else None
    src = _resolve(source, revision, variant, token)
    names = plan_components(src, options.components)
    tiny_components = tiny_names("vae_encoder" in names) if tiny is not None else []
    if tiny is not None:
        check_fits(tiny, _read_json(src.path / "unet" / "config.json"), _read_json(src.path / "vae" / "config.json"))
    rows: list[tuple[str, int, float, float | None]] = []
    with PackageWriter(output, overwrite) as folder:
        entries = _export_components(src, names, folder, options, rows)
        if tiny is not None:
            entries.update(export_tiny_components(tiny, tiny_components, folder, options, src.pipeline_class, rows))
        _write_support_files(src, names + tiny_components, folder)
        write_json(folder / MANIFEST_NAME, _manifest(src, names, options, entries))
    logger.info("exported %s to %s\n%s", src.id, output, summary_table(rows))
    return output


def _resolve(source: str | Path, revision: str | None, variant: str | None, token: str | bool | None) -> Any:
    """The checkpoint as a local diffusers folder; a source that cannot be found is an argument error."""
    from diffrt.export.checkpoint import resolve_source

    try:
        return resolve_source(source, revision=revision, variant=variant, token=token)
    except ExportError as error:
        raise InputError(f"`source`: {error}") from error


def available_components(src: Any) -> list[str]:
    """The package components a checkpoint can give, in export order."""
    have = src.components
    names = [name for name in ("text_encoder", "text_encoder_2", "unet") if name in have]
    return names + (["vae_encoder", "vae_decoder"] if "vae" in have else [])


def plan_components(src: Any, requested: Sequence[str] | None) -> list[str]:
    """The components to export; InputError for one the checkpoint lacks, ConfigError for an unsupported class."""
    available = available_components(src)
    if requested is not None:
        missing = [name for name in requested if name not in available]
        if missing:
            raise invalid("components", f"a subset of what {src.id} has ({', '.join(available)})", missing[0])
    names = [name for name in available if requested is None or name in requested]
    for name in names:
        folder = WEIGHTS_OF[name]
        allowed, class_name = SOURCE_CLASSES[folder], src.components[folder][1]
        if class_name not in allowed:
            raise invalid(f"{folder} class", f"one of {', '.join(allowed)}", class_name, ConfigError)
    return names


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _load_graph(src: Any, name: str) -> ComponentGraph:
    root: Path = src.path
    if name.startswith("text_encoder"):
        return text_encoder_graph(name, root, src.components[name][1], src.variant)
    if name == "unet":
        pooled = _read_json(root / "text_encoder_2" / "config.json").get("projection_dim")
        aesthetics = bool(_read_json(root / INDEX_NAME).get("requires_aesthetics_score"))
        return unet_graph(root, src.variant, pooled, aesthetics)
    return vae_graph(name, root, src.variant)


def _export_components(src: Any, names: list[str], folder: Path, options: Options,
                       rows: list[tuple[str, int, float, float | None]]) -> dict[str, dict[str, Any]]:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    entries = {}
    # The bar shows on terminals only; the per-component log line also reaches CI logs, without breaking the bar.
    with logging_redirect_tqdm(), tqdm(names, desc="export", unit="component", disable=None) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            entries[name] = _export_component(src, name, folder, options, rows)
            seconds, diff = rows[-1][2:]
            logger.info("%s: %s in %.1f s, max abs diff %s", name, entries[name]["precision"], seconds,
                        "not checked" if diff is None else f"{diff:.3g}")
    return entries


def _export_component(src: Any, name: str, folder: Path, options: Options,
                      rows: list[tuple[str, int, float, float | None]]) -> dict[str, Any]:
    """Load, export and validate one component; its manifest entry."""
    vae_config = _read_json(src.path / "vae" / "config.json") if name.startswith("vae") else {}
    precision = component_precision(name, options.precision, src.pipeline_class, vae_config)
    return export_component(_load_graph(src, name), precision, folder, options, rows)


def export_component(graph: ComponentGraph, precision: str, folder: Path, options: Options,
                     rows: list[tuple[str, int, float, float | None]]) -> dict[str, Any]:
    """Export and validate a loaded component into `folder / graph.name`; appends its summary row."""
    name = graph.name
    cases = reference_cases(graph) if options.validate else []
    fused = options.target == "cuda" and name in cuda_target.FUSED_COMPONENTS
    opset, translations = options.opset, None
    if fused:
        cuda_target.prepare_module(name, graph.module)
        translations = cuda_target.translation_table()
    prepare_for_export(graph, precision, float32_group_norm=not fused)
    # A graph to fuse is written with every weight external: the fusions then run on the graph alone.
    threshold = 0 if fused else options.external_data_threshold
    exported = export_graph(graph, folder / name, opset, threshold, translations)
    graph.module = None  # type: ignore[assignment]  # free the weights before ONNX Runtime loads its copy
    gc.collect()
    if fused:
        external = exported.weight_bytes > options.external_data_threshold
        data = cuda_target.fuse(exported.path, name, external)
        size = sum(f.stat().st_size for f in (exported.path, folder / name / (data or MODEL_NAME)))
        exported = replace(exported, external_data=data, size_bytes=size if data else exported.path.stat().st_size)
    if graph.config_file is not None:
        copy_file(graph.config_file, folder / name / "config.json")
    validation = None
    if options.validate and fused and not cuda_usable_here():
        logger.warning("%s: not validated: its fused CUDA kernels run on a GPU only, and there is none here "
                       "(the manifest records validation null)", name)
    elif options.validate:
        tolerance = options.tolerance if options.tolerance is not None else DEFAULT_TOLERANCE[precision]
        provider = "cuda" if options.target == "cuda" and cuda_usable_here() else "cpu"
        validation = validate_export(graph, exported.path, cases, tolerance, provider)
    rows.append((name, exported.size_bytes, exported.seconds, validation.max_abs_diff if validation else None))
    return component_entry(
        file=f"{name}/{MODEL_NAME}", external_data=exported.external_data, precision=precision, opset=opset,
        inputs=[s.manifest() for s in graph.inputs], outputs=[s.manifest() for s in graph.outputs],
        dims=graph.dims, validation=validation.manifest() if validation else None,
    )


def cuda_usable_here() -> bool:
    """ONNX Runtime with the CUDA provider and a GPU: validation of the cuda target can run."""
    try:
        from diffrt.runtime.engines.onnxruntime_cuda import cuda_usable
    except ImportError:  # no onnxruntime at all: validation says so itself
        return False
    return cuda_usable()


def _write_support_files(src: Any, names: list[str], folder: Path) -> None:
    """Scheduler config, tokenizers of the exported text encoders, and model_index.json."""
    others = []
    scheduler = src.path / "scheduler" / "scheduler_config.json"
    if "scheduler" in src.components and scheduler.is_file():
        copy_file(scheduler, folder / "scheduler" / "scheduler_config.json")
        others.append("scheduler")
    for encoder, tokenizer in TOKENIZER_OF.items():
        if encoder in names and tokenizer in src.components:
            write_tokenizer(src.path / tokenizer, folder / tokenizer)
            others.append(tokenizer)
    write_json(folder / INDEX_NAME, model_index(_read_json(src.path / INDEX_NAME), names, others))


def _exporter_versions() -> dict[str, str]:
    """Versions of everything that shaped the graphs (onnxruntime: the validator, absent without validation)."""
    from importlib.metadata import PackageNotFoundError, version

    from diffrt import __version__

    versions = {"diffrt": __version__}
    for name, distributions in EXPORTER_DISTRIBUTIONS.items():
        for distribution in distributions:
            try:
                versions[name] = version(distribution)
                break
            except PackageNotFoundError:
                continue
    return versions


def _manifest(src: Any, names: list[str], options: Options, entries: dict[str, Any]) -> dict[str, Any]:
    used = {WEIGHTS_OF[name] for name in names}
    hashes = {rel: digest for rel, digest in src.weights_sha256().items() if rel.split("/")[0] in used}
    source = {"id": str(src.id), "revision": src.revision, "kind": src.kind, "weights_sha256": hashes}
    return build_manifest(pipeline=src.pipeline_class, source=source, precision=options.precision,
                          target=options.target, opset=options.opset, exporter=_exporter_versions(),
                          components=entries)

