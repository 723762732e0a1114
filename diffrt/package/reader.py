"""Read and validate a model package folder (see docs/package-format.md).

Our packages carry a `diffrt.json` manifest; Optimum's (and Diffusers' legacy ONNX) folders have the same layout
without it, so everything the runtime needs is also found from `model_index.json` and the component folders.
All files are checked when the package is opened, so a missing or corrupt file is a `PackageError` naming it
before any engine is built: paths stay inside the package (checked as written, so Hub-cache symlinks load), recorded
sizes match (`verify()` compares the sha256 too), each ONNX graph's inputs and outputs match the manifest
(`integrity.py`, read by `onnx_io.py`), and config values are typed, ranged and fit the graphs (`config_checks.py`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from diffrt.errors import InputError, PackageError
from diffrt.package.config_checks import check_component_config
from diffrt.package.files import read_json
from diffrt.package.integrity import check_graph_io, check_sizes, inside_package, recorded_files, verify_hashes
from diffrt.package.names import (
    CLASS_PREFIXES,
    CONFIG_NAME,
    DEEP_CACHE_FEATURE,
    DEEP_CACHE_KEY,
    FORMAT_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    MODEL_FILE,
    ONNX_COMPONENTS,
    SCHEDULER_CONFIG,
    SUPPORTED_FORMAT_VERSIONS,
    TOKENIZERS,
    UNET_SHALLOW,
)
from diffrt.package.onnx_io import GraphTensor, read_graph_io
from diffrt.package.specs import TensorSpec, parse_dim_ranges

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentInfo:
    """One ONNX component: its model file, its config.json, and its manifest entry (None in Optimum packages)."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    #: the ONNX graph's (inputs, outputs), read from the model file when the package is opened
    graph: tuple[list[GraphTensor], list[GraphTensor]] = field(default_factory=lambda: ([], []), compare=False)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def dim_ranges(self) -> dict[str, tuple[int, int]]:
        """Inclusive size range of each named dynamic dimension, from the manifest ({} without one)."""
        return parse_dim_ranges((self.manifest or {}).get("dims"))

    @property
    def inputs(self) -> list[TensorSpec] | None:
        return _specs(self.manifest, "inputs")

    @property
    def outputs(self) -> list[TensorSpec] | None:
        return _specs(self.manifest, "outputs")


def _specs(manifest: dict[str, Any] | None, key: str) -> list[TensorSpec] | None:
    if not manifest or key not in manifest:
        return None
    return [TensorSpec.from_manifest(entry) for entry in manifest[key]]


def strip_class_prefix(class_name: str) -> str:
    """`ORTStableDiffusionPipeline` / `OnnxStableDiffusionPipeline` -> `StableDiffusionPipeline`."""
    for prefix in CLASS_PREFIXES:
        rest = class_name[len(prefix) :]
        if class_name.startswith(prefix) and rest[:1].isupper():
            return rest
    return class_name


def _listed(index: Mapping[str, Any], name: str) -> bool:
    """model_index.json lists a component as [library, class]; [null, null] means the pipeline has none."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and any(part is not None for part in entry)


class ModelPackage:
    """A validated model package; open one with `ModelPackage.open(path)`."""

    def __init__(
        self,
        root: Path,
        index: dict[str, Any],
        manifest: dict[str, Any] | None,
        components: dict[str, ComponentInfo],
        tokenizer_dirs: dict[str, Path],
        scheduler_config: dict[str, Any] | None,
    ) -> None:
        self.root = root
        self.index = index
        self.manifest = manifest
        self.components = components
        self.tokenizer_dirs = tokenizer_dirs
        self._scheduler_config = scheduler_config

    @classmethod
    def open(cls, path: str | Path) -> "ModelPackage":
        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"model package folder {root} does not exist")
        if not (root / INDEX_NAME).is_file():
            raise PackageError(f"{root} is not a model package: it has no {INDEX_NAME}")
        index = read_json(root / INDEX_NAME, required=True)
        manifest = _read_manifest(root)
        components = _find_components(root, index, manifest)
        tokenizer_dirs = _find_tokenizers(root, index)
        scheduler = None
        if (root / SCHEDULER_CONFIG).is_file():
            scheduler = read_json(root / SCHEDULER_CONFIG)
        elif _listed(index, "scheduler"):
            raise PackageError(f"{root / SCHEDULER_CONFIG} is missing (model_index.json lists a scheduler)")
        _check_deep_cache(root, manifest, components)
        package = cls(root, index, manifest, components, tokenizer_dirs, scheduler)
        logger.debug("opened %r", package)
        return package

    # ----- what the package is -----
    @property
    def pipeline_class(self) -> str:
        """The Diffusers pipeline class this package runs as (Optimum's `ORT` prefix stripped)."""
        name = self.index.get("_class_name") or (self.manifest or {}).get("pipeline")
        if not isinstance(name, str) or not name:
            raise PackageError(f"{self.root / INDEX_NAME} has no `_class_name` (and no manifest names the pipeline)")
        return strip_class_prefix(name)

    @property
    def format_version(self) -> int | None:
        return None if self.manifest is None else int(self.manifest["format_version"])

    @property
    def deep_cache_branch(self) -> int | None:
        """DeepCache's skip branch when the package was exported with it (its UNet then also outputs the feature
        `unet_shallow` takes); None otherwise."""
        record = (self.manifest or {}).get(DEEP_CACHE_KEY)
        return None if record is None else int(record["branch"])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        if self._scheduler_config is None:
            raise PackageError(f"{self.root / SCHEDULER_CONFIG} is missing")
        return dict(self._scheduler_config)

    @property
    def vae_config(self) -> dict[str, Any]:
        """The VAE's config (scaling_factor, block_out_channels, ...) from vae_decoder/ (or vae_encoder/)."""
        return self._config_of(("vae_decoder", "vae_encoder", "vae"), "the VAE's scaling_factor")

    @property
    def unet_config(self) -> dict[str, Any]:
        return self._config_of(("unet",), "the UNet's sample_size and conditioning")

    def _config_of(self, folders: tuple[str, ...], why: str) -> dict[str, Any]:
        for folder in folders:
            path = self.root / folder / CONFIG_NAME
            if path.is_file():
                return read_json(path)
        raise PackageError(f"{self.root / folders[0] / CONFIG_NAME} is missing; the runtime needs it for {why}")

    # ----- lookups -----
    def has(self, name: str) -> bool:
        """Whether the package has component, tokenizer or scheduler `name`."""
        if name == "scheduler":
            return self._scheduler_config is not None
        return name in self.components or name in self.tokenizer_dirs

    def component(self, name: str) -> ComponentInfo:
        info = self.components.get(name)
        if info is None:
            raise PackageError(
                f"package {self.root} has no `{name}` component; it has: {', '.join(self.components) or 'none'}"
            )
        return info

    def tokenizer_dir(self, name: str = "tokenizer") -> Path:
        folder = self.tokenizer_dirs.get(name)
        if folder is None:
            raise PackageError(
                f"package {self.root} has no `{name}` folder; tokenizers: {', '.join(self.tokenizer_dirs) or 'none'}"
            )
        return folder

    def require(self, *names: str) -> None:
        """Raise PackageError naming every one of `names` (components, tokenizers, "scheduler") that is missing."""
        missing = [name for name in names if not self.has(name)]
        if missing:
            have = [*self.components, *self.tokenizer_dirs] + (["scheduler"] if self.has("scheduler") else [])
            raise PackageError(
                f"package {self.root} ({self.index.get('_class_name', '?')}) lacks {', '.join(missing)}, "
                f"which this pipeline needs; it has: {', '.join(have) or 'nothing'}"
            )

    def graph_io(self, name: str) -> tuple[list[GraphTensor], list[GraphTensor]]:
        """Component `name`'s ONNX graph (inputs, outputs), as read from its model file at open."""
        return self.component(name).graph

    def verify(self) -> int:
        """Hash every component file against the sha256 the manifest records; returns how many files were checked.

        Raises PackageError naming the first file that differs, or when no file has a recorded hash (Optimum's
        packages have no manifest; older diffrt packages no `files`); components without one are named in a warning.
        """
        checked, unrecorded = 0, []
        for name, info in self.components.items():
            where = f"{self.root / MANIFEST_NAME}: component `{name}`"
            files = recorded_files(self.root, info.manifest or {}, where)
            if not files:
                unrecorded.append(name)
            checked += verify_hashes(files, where)
        if checked == 0:
            raise PackageError(f"package {self.root} records no sha256 for its files (it has no {MANIFEST_NAME}, or "
                               "was written before diffrt recorded hashes): nothing to verify against; export it again")
        if unrecorded:
            logger.warning("%s: no sha256 recorded for %s (written without a manifest, or before diffrt recorded "
                           "hashes): not verified", self.root, ", ".join(unrecorded))
        return checked

    def __repr__(self) -> str:
        kind = "diffrt" if self.manifest is not None else "optimum"
        return f"ModelPackage({str(self.root)!r}, {kind}, components={list(self.components)})"


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise PackageError(f"{path}: `format` must be {FORMAT_NAME!r}; got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise PackageError(
            f"{path}: `format_version` must be one of {list(SUPPORTED_FORMAT_VERSIONS)} (the package formats this "
            f"diffrt reads); got {version!r}. A newer diffrt may read it."
        )
    if not isinstance(manifest.get("components", {}), dict):
        raise PackageError(f"{path}: `components` must be an object of component entries")
    return manifest


def _check_deep_cache(root: Path, manifest: Mapping[str, Any] | None,
                      components: Mapping[str, ComponentInfo]) -> None:
    """A `deep_cache` record names a skip branch, and the UNet output and `unet_shallow` input it implies exist."""
    record = (manifest or {}).get(DEEP_CACHE_KEY)
    if record is None:
        return
    where = f"{root / MANIFEST_NAME}: `{DEEP_CACHE_KEY}`"
    branch = record.get("branch") if isinstance(record, dict) else None
    if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
        raise PackageError(f"{where} must be {{\"branch\": an int >= 0}}; got {record!r}")
    unet, shallow = components.get("unet"), components.get(UNET_SHALLOW)
    if unet is None or shallow is None:
        raise PackageError(f"{where}: a package with DeepCache needs the `unet` and `{UNET_SHALLOW}` components; it "
                           f"has {', '.join(components) or 'none'}")
    if DEEP_CACHE_FEATURE not in [tensor.name for tensor in unet.graph[1]] \
            or DEEP_CACHE_FEATURE not in [tensor.name for tensor in shallow.graph[0]]:
        raise PackageError(f"{where}: the `unet` graph must output `{DEEP_CACHE_FEATURE}` and the `{UNET_SHALLOW}` "
                           "graph take it; the package was modified after export")


def _manifest_component(root: Path, name: str, entry: Any) -> ComponentInfo:
    where = f"{root / MANIFEST_NAME}: component `{name}`"
    if not isinstance(entry, dict) or not isinstance(entry.get("file", f"{name}/{MODEL_FILE}"), str):
        raise PackageError(f"{where} must be an object with a `file` path")
    path = root / inside_package(entry.get("file", f"{name}/{MODEL_FILE}"), f"{where}: `file`")
    if not path.is_file():
        raise PackageError(f"{where}: model file {path} is missing")
    external = entry.get("external_data")
    if external and not any((base / inside_package(external, f"{where}: `external_data`")).is_file()
                            for base in (root, path.parent)):
        raise PackageError(f"{where}: external data file {external} is missing")
    check_sizes(recorded_files(root, entry, where), where)
    try:
        dims = parse_dim_ranges(entry.get("dims"))
        declared = (_specs(entry, "inputs"), _specs(entry, "outputs"))
    except (InputError, KeyError, TypeError) as error:
        raise PackageError(f"{where} has an invalid `dims` / `inputs` / `outputs` entry: {error}") from error
    graph = read_graph_io(path)
    check_graph_io(path, graph, declared, where)
    return _checked(ComponentInfo(name, path, read_json(path.parent / CONFIG_NAME), entry, graph), dims)


def _plain_component(path: Path, name: str) -> ComponentInfo:
    """A component found by its folder (Optimum's packages have no manifest): its graph tells the I/O."""
    return _checked(ComponentInfo(name, path, read_json(path.parent / CONFIG_NAME), None, read_graph_io(path)), {})


def _checked(info: ComponentInfo, dims: Mapping[str, tuple[int, int]]) -> ComponentInfo:
    """Config values typed, ranged and consistent with the graph (see `config_checks`)."""
    if info.config:
        shapes = {tensor.name: tensor.shape for tensor in (*info.graph[0], *info.graph[1])}
        check_component_config(info.name, info.config, info.folder / CONFIG_NAME, shapes, dims)
    return info


def _find_components(
    root: Path, index: Mapping[str, Any], manifest: Mapping[str, Any] | None
) -> dict[str, ComponentInfo]:
    """Manifest components first; then every known component model_index.json lists or whose folder exists."""
    entries = dict((manifest or {}).get("components", {}))
    components = {name: _manifest_component(root, name, entry) for name, entry in entries.items()}
    for name in ONNX_COMPONENTS:
        if name in components:
            continue
        path = root / name / MODEL_FILE
        if path.is_file():
            components[name] = _plain_component(path, name)
        elif _listed(index, name):
            what = "folder" if not path.parent.is_dir() else "model file"
            raise PackageError(f"component `{name}` is listed in model_index.json but its {what} {path} is missing")
    if _listed(index, "vae") and "vae_decoder" not in components:
        raise PackageError(f"{root / 'vae_decoder' / MODEL_FILE} is missing (model_index.json lists a vae)")
    return components


def _find_tokenizers(root: Path, index: Mapping[str, Any]) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    for name in TOKENIZERS:
        folder = root / name
        if folder.is_dir():
            folders[name] = folder
        elif _listed(index, name):
            raise PackageError(f"tokenizer folder {folder} is missing (model_index.json lists `{name}`)")
    return folders
