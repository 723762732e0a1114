"""Checkpoint sources for export: a local diffusers folder, a Hugging Face Hub repo id, or an original-layout file.

`resolve_source` turns any of them into a `CheckpointSource`: a validated local diffusers folder plus what the
manifest records about it (kind, id, revision, variant, weight files and their hashes). Hub downloads go through
`huggingface_hub`, which honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and the saved token itself; only the
files export reads are fetched. Single files are converted once into a cached diffusers folder.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffrt.errors import ConfigError, ExportError, invalid
from diffrt.package.files import files_sha256, read_json
from diffrt.package.names import CONFIG_NAME, INDEX_NAME, SCHEDULER_CONFIG
from diffrt.runtime.hub import hub_call, hub_snapshot

logger = logging.getLogger(__name__)

# Components a deployment package never carries (the runtime has no safety checker / image prompt support)
SKIPPED_COMPONENTS = frozenset({"safety_checker", "feature_extractor", "image_encoder"})
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
VARIANT = re.compile(r"^[A-Za-z0-9_]+$")
# diffusers / transformers weight names: <base>[.<variant>][-00001-of-00002].safetensors
WEIGHT_NAME = re.compile(r"^(?P<base>[^.]+)(?:\.(?P<variant>[^.-]+))?(?:-\d{5}-of-\d{5})?\.safetensors$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
#: `check(source, pipeline_class, components)`, see `resolve_source`
IndexCheck = Callable[[str, str, dict[str, tuple[str, str]]], None]


@dataclass
class CheckpointSource:
    """A resolved checkpoint: `path` is a local diffusers folder (for a single file, the one materialized)."""

    kind: str  # "folder" | "hub" | "single_file"
    id: str  # the source string as given
    path: Path
    revision: str | None  # Hub: the commit hash the files come from
    variant: str | None
    pipeline_class: str  # model_index.json `_class_name`
    components: dict[str, tuple[str, str]]  # name -> (library, class), skipped components left out
    weight_files: dict[str, Path]  # path relative to `path` -> absolute path
    model_type: str | None = None  # single files: diffusers' model type name (v1, v2, xl_base, ...)
    clip_skip: int = 0  # single SD 2.x files keep OpenCLIP's last layer: read hidden_states[-(clip_skip + 1)]
    _sha256: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def weights_sha256(self) -> dict[str, str]:
        """sha256 of every weight file, keyed like `weight_files`; computed on first call."""
        if self._sha256 is None:
            self._sha256 = {rel: files_sha256([p]) for rel, p in sorted(self.weight_files.items())}
        return dict(self._sha256)


def resolve_source(
    source: str | Path,
    revision: str | None = None,
    variant: str | None = None,
    token: str | bool | None = None,
    *,
    config_folder: str | Path | None = None,
    config_overrides: dict[str, dict[str, Any]] | None = None,
    original_config: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    cache_dir: str | Path | None = None,
    check: IndexCheck | None = None,
) -> CheckpointSource:
    """Resolve a folder, Hub repo id (`owner/name`) or `.safetensors` single file into a `CheckpointSource`.

    The keyword-only arguments apply to single files: `config_folder` (a diffusers folder whose configs and
    tokenizers to use), `config_overrides` ({component: {key: value}}), `original_config` (the parsed LDM
    yaml), `prediction_type`, and `cache_dir` (where the converted folder is kept; default $DIFFRT_CACHE or
    ~/.cache/diffrt). `check(source, pipeline_class, components)` runs as soon as model_index.json is read, before
    component folders are inspected or Hub weights downloaded: the exporter refuses what it cannot export there.
    """
    if variant is not None and (not isinstance(variant, str) or not VARIANT.match(variant)):
        raise invalid("variant", "None or a weight variant name such as 'fp16'", variant)
    text = str(source)
    path = Path(text).expanduser()
    single = {"config_folder": config_folder, "config_overrides": config_overrides,
              "original_config": original_config, "prediction_type": prediction_type, "cache_dir": cache_dir}
    if path.is_file() or path.suffix in (".safetensors", ".ckpt"):
        for name, value in (("revision", revision), ("variant", variant)):
            if value is not None:
                raise invalid(name, "None for a single-file checkpoint (it applies to folders and Hub repos)", value)
        return _single_file(path, text, token, single, check)
    given = [name for name, value in single.items() if value is not None]
    if given:
        raise invalid(given[0], "None unless the source is a single .safetensors file", single[given[0]])
    if path.is_dir():
        if revision is not None:
            raise invalid("revision", "None for a local folder (it applies to Hub repo ids)", revision)
        return _from_folder(path.resolve(), "folder", text, None, variant, check)
    if REPO_ID.match(text) and text.split("/")[0] not in (".", ".."):
        folder = _download_repo(text, revision, variant, token, check)  # checks the index before the download
        return _from_folder(folder, "hub", text, folder.name, variant)
    raise ExportError(f"checkpoint source not found: {text!r} is neither a local folder, a .safetensors file nor "
                      "a Hub repo id (owner/name)")


def _single_file(path: Path, text: str, token: str | bool | None, options: dict[str, Any],
                 check: IndexCheck | None) -> CheckpointSource:
    from diffrt.export.single_file import materialize_single_file

    result = materialize_single_file(path, token=token, **options)
    source = _from_folder(result.path, "single_file", text, None, None, check)
    source.model_type, source.clip_skip = result.model_type, result.clip_skip
    return source


def read_checkpoint_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (model_index.json, a config): ConfigError when missing or not a JSON object."""
    return read_json(path, required=True, error=ConfigError)


def read_components(index: dict[str, Any], index_path: Path) -> dict[str, tuple[str, str]]:
    """model_index.json entries `name: [library, class]`, without absent (null) and skipped components."""
    components = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2 or not all(v is None or isinstance(v, str) for v in value):
            raise ConfigError(f"{index_path}: `{name}` must be [library, class] or [null, null]; got {value!r}")
        if value[0] is not None and value[1] is not None and name not in SKIPPED_COMPONENTS:
            components[name] = (value[0], value[1])
    return components


def _from_folder(folder: Path, kind: str, text: str, revision: str | None, variant: str | None,
                 check: IndexCheck | None = None) -> CheckpointSource:
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        raise ExportError(f"not a diffusers checkpoint folder: {index_path} not found")
    index = read_checkpoint_json(index_path)
    class_name = _pipeline_class(index, index_path)
    components = read_components(index, index_path)
    if check is not None:
        check(text, class_name, components)
    weight_files: dict[str, Path] = {}
    for name in components:
        for weights in _check_component(folder, name, variant):
            weight_files[weights.relative_to(folder).as_posix()] = weights
    return CheckpointSource(kind, text, folder, revision, variant, class_name, components, weight_files)


def _pipeline_class(index: dict[str, Any], index_path: Path) -> str:
    name = index.get("_class_name")
    if not isinstance(name, str):
        raise ConfigError(f"{index_path}: `_class_name` (the pipeline class) is missing")
    return name


def _check_component(folder: Path, name: str, variant: str | None) -> list[Path]:
    """Validate one component folder; returns its weight files (none for schedulers and tokenizers)."""
    directory = folder / name
    if not directory.is_dir():
        raise ExportError(f"component folder missing: {directory} (listed in model_index.json)")
    if name.startswith("tokenizer"):
        if not any((directory / f).is_file() for f in TOKENIZER_FILES):
            raise ExportError(f"tokenizer files missing in {directory}: expected one of {list(TOKENIZER_FILES)}")
        return []
    read_checkpoint_json(directory / (SCHEDULER_CONFIG.name if name.startswith("scheduler") else CONFIG_NAME))
    if name.startswith("scheduler"):
        return []
    return _weights(directory, variant)


def _weights(directory: Path, variant: str | None) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file())
    chosen = [p for p in files if (m := WEIGHT_NAME.match(p.name)) and m["variant"] == variant]
    if chosen:
        return chosen
    tensors = [p.name for p in files if p.suffix == ".safetensors"]
    if variant is not None:
        raise ExportError(f"no `{variant}` weights in {directory}: expected *.{variant}.safetensors; found "
                          f"{tensors or 'no .safetensors files'}")
    if tensors:
        raise ExportError(f"no default weights in {directory}: only variants {tensors}; pass variant=")
    pickled = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise ExportError(f"only pickle-format weights {pickled} in {directory}: diffrt reads .safetensors only "
                          "(pickle files can run code when loaded)")
    raise ExportError(f"no weights in {directory}: expected *.safetensors")


def hub_patterns(components: dict[str, tuple[str, str]], variant: str | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns that fetch configs, tokenizers and the chosen variant's safetensors only."""
    allow = [INDEX_NAME]
    for name in components:
        allow += [f"{name}/*.json", f"{name}/*.txt"]
        if not name.startswith(("tokenizer", "scheduler")):
            allow += [f"{name}/*.{variant}.safetensors", f"{name}/*.{variant}-*.safetensors"] if variant else [
                f"{name}/*.safetensors"]
    # without a variant, `*.safetensors` would also match `x.fp16.safetensors`; weight names have no other dot
    ignore = [] if variant else ["*.*.safetensors"]
    return allow, ignore


def _download_repo(repo_id: str, revision: str | None, variant: str | None, token: str | bool | None,
                   check: IndexCheck | None) -> Path:
    from huggingface_hub import hf_hub_download

    index_path = Path(hub_call(lambda: hf_hub_download(repo_id, INDEX_NAME, revision=revision, token=token),
                               repo_id, revision, f"{INDEX_NAME} (not a diffusers pipeline repo?)", ExportError))
    index = read_checkpoint_json(index_path)
    components = read_components(index, index_path)
    if check is not None:  # before the weights are downloaded
        check(repo_id, _pipeline_class(index, index_path), components)
    allow, ignore = hub_patterns(components, variant)
    return hub_snapshot(repo_id, revision=revision, allow_patterns=allow, ignore_patterns=ignore, token=token,
                        purpose="the checkpoint files", error=ExportError)


__all__ = ["CheckpointSource", "hub_patterns", "read_checkpoint_json", "resolve_source"]
