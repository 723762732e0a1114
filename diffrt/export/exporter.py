"""`export_pipeline`: a diffusers checkpoint (folder, Hub id or single file) -> a model package (ONNX + manifest).

It checks every argument first (nothing is loaded or written for a bad one), resolves the source,
then exports each component in turn (load our torch module -> torch.onnx -> ONNX Runtime check), writing into a
temporary folder beside the output that is renamed into place only when everything succeeded.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from diffrt.errors import ExportError, InputError, PackageError, invalid
from diffrt.export.component import Options, Rows, check_options, export_component, summary_table
from diffrt.export.controlnet_graph import text_time_facts
from diffrt.export.onnx import (
    COMPONENTS,
    EXTERNAL_DATA_THRESHOLD,
    T5_ENCODER_CLASSES,
    TARGET_OPSETS,
    ComponentGraph,
    text_encoder_graph,
    unet_graph,
    vae_graph,
)
from diffrt.export.plan import (
    T5_TOKENIZER_CLASSES,
    TOKENIZER_OF,
    WEIGHTS_OF,
    bundled_controlnets,
    check_index,
    plan_components,
)
from diffrt.export.precision import component_precision
from diffrt.export.preflight import check_free_space, check_memory, check_weight_files
from diffrt.export.taesd import WEIGHTS_FILE as TINY_WEIGHTS
from diffrt.export.taesd import check_fits, export_tiny_components, resolve_tiny_vae, tiny_names
from diffrt.export.tokenizers import write_t5_tokenizer, write_tokenizer
from diffrt.package.files import copy_file, read_json, write_json
from diffrt.package.leftovers import remove_stale_temp
from diffrt.package.names import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, SCHEDULER_CONFIG, UNET_SHALLOW
from diffrt.package.output import check_output, output_path
from diffrt.package.writer import PackageWriter, build_manifest, model_index, record_component_files

__all__ = ["export_pipeline", "add_parameter_maps", "COMPONENTS", "TARGET_OPSETS"]

logger = logging.getLogger(__name__)

EXPORTER_DISTRIBUTIONS = {"torch": ("torch",), "onnx": ("onnx",), "onnxscript": ("onnxscript",),
                          "transformers": ("transformers",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


def export_pipeline(source: str | Path, output: str | Path, *, revision: str | None = None,
                    variant: str | None = None, precision: str = "fp32", target: str = "onnxruntime",
                    opset: int | None = None, components: Sequence[str] | None = None, overwrite: bool = False,
                    validate: bool = True, tolerance: float | None = None, token: str | bool | None = None,
                    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                    tiny_vae: str | Path | None = None, controlnets: Sequence[str | Path] | None = None,
                    config_folder: str | Path | None = None, deep_cache: bool = False,
                    deep_cache_branch: int = 0) -> Path:
    """Export the checkpoint `source` to the model package folder `output`; returns `output`.

    `precision` fp32 | fp16 | bf16 (float32 islands kept, see `diffrt.export.precision`); `target` onnxruntime
    (opset 23, fused Attention) | tensorrt (opset 18); `components` a subset of text_encoder, text_encoder_2,
    text_encoder_3, unet, transformer, vae_encoder, vae_decoder (default: all the checkpoint has: SD3 and FLUX
    checkpoints give a `transformer` and a T5 encoder); `tolerance` overrides the validation bound (relative to the
    output scale; defaults per precision and component in `default_tolerance`). `tiny_vae`, an AutoencoderTiny
    (TAESD) folder or Hub repo id, adds `vae_decoder_tiny` (+ `vae_encoder_tiny` with a vae_encoder); see
    `diffrt.export.taesd`. `controlnets`, ControlNetModel folders or Hub repo ids (each optionally `NAME=SOURCE`),
    adds `controlnet_<name>` components and exports the UNet with their residual inputs (see
    `diffrt.export.controlnet`); the package then runs as the ControlNet pipeline of its kind. `config_folder`, for
    a single `.safetensors` source only: a diffusers folder of the same model family whose configs and tokenizers to
    use and whose components the file lacks to take (FLUX.1 files hold the transformer alone; see
    `diffrt.export.single_file`). `deep_cache`: the UNet also outputs DeepCache's feature for skip branch
    `deep_cache_branch` (0: the shallowest, DeepCache's default; up to the UNet's skip connections less one) and the
    package gains `unet_shallow`, which the runtime runs between full UNet steps (`deep_cache_interval`; see
    `diffrt.export.deep_cache`). It does not combine with `controlnets`.
    """
    options = check_options(precision, target, opset, components, validate, tolerance, external_data_threshold)
    _check_deep_cache_arguments(deep_cache, deep_cache_branch, controlnets)
    output = output_path(output)
    remove_stale_temp(output)  # a killed earlier run's temp folders (and maybe the package it was replacing)
    local = _local_sources(source, tiny_vae) + _local_controlnets(controlnets)
    local += [("config folder", Path(config_folder).expanduser())] if config_folder is not None else []
    check_output(output, overwrite, local)
    # The tiny VAE first: its files are small, so a wrong one fails before a large checkpoint download.
    tiny = resolve_tiny_vae(tiny_vae, token=token) if tiny_vae is not None else None
    src = _resolve(source, revision, variant, token, options.components, config_folder)
    names = plan_components(src, options.components)
    tiny_components = tiny_names("vae_encoder" in names) if tiny is not None else []
    if tiny is not None:
        # A transformer's latents are the VAE's (FLUX's transformer sees them packed 2x2, so its channels differ).
        unet_config = read_json(src.path / "unet" / CONFIG_NAME) if "unet" in src.components else {}
        check_fits(tiny, unet_config, read_json(src.path / "vae" / CONFIG_NAME))
    controlnets = bundled_controlnets(src, options.components, controlnets)
    branch = _deep_cache_branch(src, names, deep_cache, deep_cache_branch, controlnets)
    control = _controlnets(src, names, controlnets, revision, variant, token)
    sources = local + _resolved_sources(src, tiny) + [(f"ControlNet {c.name}", c.path) for c in control]
    check_output(output, overwrite, sources)
    weights = _weight_files(src, names) + ([tiny.path / TINY_WEIGHTS] if tiny is not None else [])
    check_free_space(output, check_weight_files(weights), options.precision)
    check_memory(src.weight_files, {WEIGHTS_OF[name] for name in names}, options.validate)
    rows: Rows = []
    with PackageWriter(output, overwrite, sources) as folder:
        entries = _export_components(src, names, folder, options, rows, residuals=bool(control), deep_cache=branch)
        if tiny is not None:
            entries.update(export_tiny_components(tiny, tiny_components, folder, options, src.pipeline_class, rows))
        if control:
            entries.update(_export_controlnets(src, control, folder, options, rows))
        _write_support_files(src, names + tiny_components, folder, [c.component for c in control])
        record_component_files(folder, entries)
        write_json(folder / MANIFEST_NAME, _manifest(src, names, options, entries, bool(control), branch))
    logger.info("exported %s to %s\n%s", src.id, output, summary_table(rows))
    return output


def _check_deep_cache_arguments(deep_cache: Any, branch: Any, controlnets: Sequence[str | Path] | None) -> None:
    """What needs no checkpoint: the types, and that DeepCache does not combine with ControlNets."""
    if not isinstance(deep_cache, bool):
        raise invalid("deep_cache", "True or False", deep_cache)
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise invalid("deep_cache_branch", "an int >= 0 (a skip connection of the UNet, 0 the shallowest)", branch)
    if branch and not deep_cache:
        raise InputError("`deep_cache_branch` applies with `deep_cache=True` (--deep-cache) only")
    if deep_cache and controlnets:
        raise InputError("`deep_cache` does not combine with `controlnets`: a ControlNet adds its residuals to every "
                         "skip connection and the mid block at every step, which the cached deep features would "
                         "drop; export the ControlNet package without --deep-cache")


def _deep_cache_branch(src: Any, names: list[str], deep_cache: bool, branch: int,
                       controlnets: Sequence[str | Path] | None) -> int | None:
    """The checked skip branch, None without DeepCache (before anything is loaded or written)."""
    if not deep_cache:
        return None
    if controlnets:  # the checkpoint's own ControlNet (a saved ControlNet pipeline)
        raise InputError(f"`deep_cache` does not combine with ControlNets, and {src.id} carries one; export it "
                         "without --deep-cache, or only its base model's components")
    if "unet" not in names:
        has_transformer = "transformer" in src.components
        raise InputError("`deep_cache` caches UNet features: " + (
            f"{src.id} denoises with a transformer" if has_transformer else "add unet to `components`"))
    from diffrt.export.deep_cache import check_branch

    return check_branch(branch, read_json(src.path / "unet" / CONFIG_NAME))


def _resolve(source: str | Path, revision: str | None, variant: str | None, token: str | bool | None,
             components: Sequence[str] | None, config_folder: str | Path | None = None) -> Any:
    """The checkpoint as a local diffusers folder; a source that cannot be found is an argument error. What diffrt
    cannot export is refused as soon as model_index.json is read (before weights are downloaded or read)."""
    from diffrt.export.checkpoint import resolve_source

    try:
        return resolve_source(source, revision=revision, variant=variant, token=token, config_folder=config_folder,
                              check=check_index(components))
    except ExportError as error:
        raise InputError(f"`source`: {error}") from error


def _local_sources(source: str | Path, tiny_vae: str | Path | None) -> list[tuple[str, Path]]:
    """The sources that are local paths, known before anything is resolved (Hub ids are not paths)."""
    given = [("source checkpoint", source), ("tiny VAE", tiny_vae)]
    return [(what, Path(path).expanduser()) for what, path in given
            if path is not None and Path(path).expanduser().exists()]


def _resolved_sources(src: Any, tiny: Any) -> list[tuple[str, Path]]:
    """Where the resolved sources' files really are: the checkpoint folder (a Hub snapshot, a converted single
    file), each weight file (Hub cache blobs), the tiny VAE."""
    found = [("source checkpoint", Path(src.path))]
    found += [("source checkpoint's weight file", path) for path in src.weight_files.values()]
    return found + ([("tiny VAE", Path(tiny.path))] if tiny is not None else [])


def _local_controlnets(controlnets: Sequence[str | Path] | None) -> list[tuple[str, Path]]:
    from diffrt.export.controlnet import split_name

    found = [split_name(spec) for spec in controlnets or []]
    return [(f"ControlNet {name}", Path(path).expanduser()) for name, path in found if Path(path).expanduser().exists()]


def _controlnets(src: Any, names: list[str], controlnets: Sequence[str | Path] | None, revision: str | None,
                 variant: str | None, token: str | bool | None) -> list[Any]:
    """The resolved ControlNets, each checked against the UNet (before anything is exported)."""
    if controlnets is None:
        return []
    from diffrt.export.controlnet import check_fits, resolve_controlnets
    from diffrt.runtime.pipelines.registry import controlnet_class_for

    if "unet" not in names:
        raise InputError("`controlnets` need the UNet in the package (it takes their residuals); add unet to "
                         "`components`")
    try:
        controlnet_class_for(src.pipeline_class)
    except PackageError as error:
        raise InputError(f"`controlnets`: {error}") from error
    unet_config = read_json(src.path / "unet" / CONFIG_NAME)
    control = resolve_controlnets(controlnets, revision if src.kind != "hub" else None, variant, token, unet_config)
    for controlnet in control:
        check_fits(controlnet, unet_config)
    return control


def _export_controlnets(src: Any, control: list[Any], folder: Path, options: Options,
                        rows: Rows) -> dict[str, dict[str, Any]]:
    from diffrt.export.controlnet import export_controlnets

    pooled, aesthetics = text_time_facts(src.path)
    return export_controlnets(control, folder, options, read_json(src.path / "unet" / CONFIG_NAME), pooled,
                              aesthetics, rows)


def _weight_files(src: Any, names: list[str]) -> list[Path]:
    """The checkpoint's weight files the export of `names` reads."""
    folders = {WEIGHTS_OF[name] for name in names}
    return [path for rel, path in sorted(src.weight_files.items()) if rel.split("/")[0] in folders]


def _load_graph(src: Any, name: str, residuals: bool = False, deep_cache: int | None = None) -> ComponentGraph:
    root: Path = src.path
    if name.startswith("text_encoder") and src.components[name][1] in T5_ENCODER_CLASSES:
        from diffrt.export.t5_encoder import t5_encoder_graph

        return t5_encoder_graph(name, root, src.variant)
    if name.startswith("text_encoder"):
        return text_encoder_graph(name, root, src.components[name][1], src.variant)
    if name == "transformer":
        from diffrt.export.transformer_graph import transformer_graph

        return transformer_graph(root, src.components[name][1], src.variant)
    if name in ("unet", UNET_SHALLOW):
        graph = unet_graph(root, src.variant, *text_time_facts(root))
        if residuals:  # a package with ControlNets: the UNet takes their residuals
            from diffrt.export.controlnet_graph import add_residual_inputs

            graph = add_residual_inputs(graph)
        if deep_cache is not None:
            from diffrt.export.deep_cache import add_feature_output, shallow_unet_graph

            graph = add_feature_output(graph, deep_cache) if name == "unet" else shallow_unet_graph(graph, deep_cache)
        return graph
    return vae_graph(name, root, src.variant)


def _export_components(src: Any, names: list[str], folder: Path, options: Options, rows: Rows,
                       residuals: bool = False, deep_cache: int | None = None) -> dict[str, dict[str, Any]]:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    entries = {}
    if deep_cache is not None:  # exported from its own load of the UNet: each graph's export frees its module
        names = [part for name in names for part in ([name, UNET_SHALLOW] if name == "unet" else [name])]
    # The bar shows on terminals only; the per-component log line also reaches CI logs, without breaking the bar.
    with logging_redirect_tqdm(), tqdm(names, desc="export", unit="component", disable=None) as bar:
        for number, name in enumerate(bar, 1):
            bar.set_postfix_str(name)
            logger.info("exporting %s (%d/%d)", name, number, len(names))
            entries[name] = _export_component(src, name, folder, options, rows, residuals, deep_cache)
            seconds, diff = rows[-1][2:]
            logger.info("%s: %s in %.1f s, max abs diff %s", name, entries[name]["precision"], seconds,
                        "not checked" if diff is None else f"{diff:.3g}")
    return entries


def _export_component(src: Any, name: str, folder: Path, options: Options, rows: Rows,
                      residuals: bool = False, deep_cache: int | None = None) -> dict[str, Any]:
    """Load, export and validate one component; its manifest entry."""
    vae_config = read_json(src.path / "vae" / CONFIG_NAME) if name.startswith("vae") else {}
    precision = component_precision(name, options.precision, src.pipeline_class, vae_config)
    return export_component(_load_graph(src, name, residuals, deep_cache), precision, folder, options, rows)


def _write_support_files(src: Any, names: list[str], folder: Path, controlnets: Sequence[str] = ()) -> None:
    """Scheduler config, tokenizers of the exported text encoders, and model_index.json."""
    others = []
    scheduler = src.path / SCHEDULER_CONFIG
    if "scheduler" in src.components and scheduler.is_file():
        copy_file(scheduler, folder / SCHEDULER_CONFIG)
        others.append("scheduler")
    for encoder, tokenizer in TOKENIZER_OF.items():
        if encoder in names and tokenizer in src.components:
            if src.components[tokenizer][1] in T5_TOKENIZER_CLASSES:
                write_t5_tokenizer(src.path / tokenizer, folder / tokenizer)
            else:
                write_tokenizer(src.path / tokenizer, folder / tokenizer)
            others.append(tokenizer)
    index = model_index(read_json(src.path / INDEX_NAME), names, others)
    if controlnets:
        from diffrt.export.controlnet import controlnet_index

        index = controlnet_index(index, controlnets)
    write_json(folder / INDEX_NAME, index)


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


def _manifest(src: Any, names: list[str], options: Options, entries: dict[str, Any],
              controlnets: bool = False, deep_cache: int | None = None) -> dict[str, Any]:
    used = {WEIGHTS_OF[name] for name in names}
    hashes = {rel: digest for rel, digest in src.weights_sha256().items() if rel.split("/")[0] in used}
    source = {"id": str(src.id), "revision": src.revision, "kind": src.kind, "weights_sha256": hashes}
    pipeline = src.pipeline_class
    if controlnets:
        from diffrt.runtime.pipelines.registry import controlnet_class_for

        pipeline = controlnet_class_for(pipeline)
    return build_manifest(pipeline=pipeline, source=source, precision=options.precision,
                          target=options.target, opset=options.opset, exporter=_exporter_versions(),
                          components=entries, deep_cache_branch=deep_cache)



def add_parameter_maps(source: str | Path, package: str | Path, *, revision: str | None = None,
                       variant: str | None = None, token: str | bool | None = None) -> dict[str, int]:
    """Record the parameter map (docs/package-format.md) in a package exported before diffrt wrote one, from the
    checkpoint `source` it was exported from, without exporting again; returns {component: parameters mapped}.

    The map is exact: each parameter, converted to the package's precision as the export does, is found by the
    digest of its bytes among the package's initializers (`diffrt.export.parameter_map`); a checkpoint that is not
    the package's source matches nothing, which is an ExportError. Only diffrt.json changes (written atomically).
    """
    from diffrt.export.onnx import prepare_for_export
    from diffrt.export.parameter_map import parameter_map
    from diffrt.package.reader import ModelPackage
    from diffrt.package.weights import PARAMETERS_KEY, canonical_parameter, read_initializers

    opened = ModelPackage.open(package)
    if opened.manifest is None:
        raise InputError(f"{package} has no diffrt.json: only diffrt packages carry a parameter map")
    src = _resolve(source, revision, variant, token, None)
    counts = {}
    manifest = dict(opened.manifest)
    for name in ("text_encoder", "text_encoder_2", "unet"):
        if not opened.has(name) or opened.component(name).manifest is None:
            continue
        graph = _load_graph(src, name)
        prepare_for_export(graph, opened.component(name).manifest.get("precision", "fp32"))  # type: ignore[union-attr]
        # Our own reader: memory-mapped, and it follows a symlinked external data file (onnx_ir refuses those).
        initializers = read_initializers(opened.component(name).path, None)
        found = parameter_map(name, graph.parameter_root, initializers)  # type: ignore[arg-type]
        matrices = [key for key, value in graph.parameter_root.state_dict().items()  # type: ignore[union-attr]
                    if value.ndim >= 2]
        missing = [key for key in matrices if canonical_parameter(name, key) not in found]
        if missing:
            raise ExportError(f"{len(missing)} of the {len(matrices)} {name} weight matrices of {source} (e.g. "
                              f"{missing[0]}) are not in {package}: not its source checkpoint, or another precision")
        manifest["components"][name][PARAMETERS_KEY] = found
        counts[name] = len(found)
    write_json(Path(package) / MANIFEST_NAME, manifest)
    return counts
