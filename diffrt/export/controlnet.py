"""ControlNets as package components: `controlnet_<name>` beside a UNet that takes their residuals.

`export_pipeline(..., controlnets=[...])` exports them with the package (its UNet then gets the residual inputs);
`add_controlnets(package, [...])` adds them to an existing package, exporting its UNet again (from the checkpoint
the manifest records, or `source`) when it was exported without residual inputs. A ControlNet source is a diffusers
ControlNetModel folder (config.json + diffusion_pytorch_model[.variant].safetensors) or a Hub repo id, optionally
named `NAME=SOURCE` (default name: the folder or repo name).
"""
from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffrt.errors import ConfigError, ExportError, InputError, PackageError, invalid
from diffrt.export.checkpoint import REPO_ID
from diffrt.export.component import Options, Rows, check_options, export_component, summary_table
from diffrt.export.controlnet_graph import controlnet_graph, text_time_facts
from diffrt.package.files import files_sha256, read_json, replace_folder, write_json
from diffrt.package.leftovers import remove_stale_temp, temp_prefix
from diffrt.package.names import (
    CONFIG_NAME,
    CONTROLNET_PREFIX,
    DEEP_CACHE_KEY,
    INDEX_NAME,
    MANIFEST_NAME,
    ONNX_ENTRY,
)
from diffrt.package.writer import record_component_files
from diffrt.runtime.hub import hub_snapshot
from diffrt.runtime.pipelines.registry import controlnet_class_for

__all__ = ["ControlNetSource", "add_controlnets", "resolve_controlnets"]

logger = logging.getLogger(__name__)

CLASS_NAME = "ControlNetModel"
WEIGHTS = "diffusion_pytorch_model"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SCRATCH = "controlnet"  # `.controlnet.tmp-PID@HOST-*` inside the package while --into exports
EXPECTED = (f"a {CLASS_NAME} folder ({CONFIG_NAME} + {WEIGHTS}.safetensors), an original-layout ControlNet "
            ".safetensors file or a Hub repo id (owner/name), optionally as NAME=SOURCE")
# The UNet's config keys a ControlNet must share: they fix the residuals' count, channels and conditioning.
MUST_MATCH = ("block_out_channels", "layers_per_block", "cross_attention_dim", "addition_embed_type",
              "addition_time_embed_dim", "projection_class_embeddings_input_dim")


@dataclass(frozen=True)
class ControlNetSource:
    """A resolved ControlNet: `name` (the package component is `controlnet_<name>`) and a local folder."""

    name: str
    id: str
    kind: str  # "folder" | "hub"
    path: Path
    revision: str | None
    config: dict[str, Any]
    file: Path | None = None  # a single file: the original the folder was converted from


    @property
    def component(self) -> str:
        return CONTROLNET_PREFIX + self.name

    def manifest(self) -> dict[str, Any]:
        weights = [self.file] if self.file is not None else sorted(self.path.glob(f"{WEIGHTS}*.safetensors"))
        return {"id": self.id, "kind": self.kind, "revision": self.revision,
                "weights_sha256": {path.name: files_sha256([path]) for path in weights}}


def split_name(spec: str | Path) -> tuple[str, str]:
    """`NAME=SOURCE` -> (NAME, SOURCE); a bare SOURCE is named after its last path part (a repo's name)."""
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise invalid("controlnet", EXPECTED, spec)
    text = str(spec)
    name, sep, source = text.partition("=")
    if not sep:
        path = Path(text.rstrip("/"))
        source, name = text, path.stem if path.suffix == ".safetensors" else path.name
    if not NAME.match(name):
        raise invalid("controlnet", "a name of letters, digits, '_', '.', '-' (NAME=SOURCE)", name)
    return name, source


def resolve_controlnets(specs: Sequence[str | Path], revision: str | None = None, variant: str | None = None,
                        token: str | bool | None = None,
                        unet_config: Mapping[str, Any] | None = None) -> list[ControlNetSource]:
    """Each `NAME=SOURCE` / SOURCE as a local folder (Hub ids fetched into the Hub cache, original-layout
    `.safetensors` files converted with the base `unet_config`); names must differ."""
    if isinstance(specs, (str, Path)) or not specs:
        raise invalid("controlnets", "a non-empty list of ControlNet sources", specs)
    sources = [_resolve(*split_name(spec), revision, variant, token, unet_config) for spec in specs]
    names = [source.name for source in sources]
    for name in names:
        if names.count(name) > 1:
            raise invalid("controlnets", "sources with different names (name them NAME=SOURCE)", name)
    return sources


def _resolve(name: str, text: str, revision: str | None, variant: str | None, token: str | bool | None,
             unet_config: Mapping[str, Any] | None) -> ControlNetSource:
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(name, path.resolve(), text, "folder", None)
    if path.is_file() and path.suffix == ".safetensors":
        from diffrt.export.single_file_controlnet import materialize_controlnet

        try:
            folder = materialize_controlnet(path.resolve(), unet_config or {})
        except ExportError as error:
            raise InputError(f"`controlnet` {text}: {error}") from error
        source = _from_folder(name, folder, text, "single_file", None)
        return ControlNetSource(name, text, "single_file", folder, None, source.config, path.resolve())
    if path.exists() or not REPO_ID.match(text):
        raise invalid("controlnet", EXPECTED, text)
    stem = f"{WEIGHTS}.{variant}" if variant else WEIGHTS
    try:
        folder = hub_snapshot(text, revision=revision, token=token, purpose=f"the {CLASS_NAME} files",
                              allow_patterns=[CONFIG_NAME, f"{stem}.safetensors", f"{stem}*.safetensors.index.json",
                                              f"{stem}-*.safetensors"], error=ExportError)
    except ExportError as error:
        raise InputError(f"`controlnet`: {error}") from error
    return _from_folder(name, folder, text, "hub", folder.name)


def _from_folder(name: str, folder: Path, text: str, kind: str, revision: str | None) -> ControlNetSource:
    if not (folder / CONFIG_NAME).is_file():
        raise invalid("controlnet", EXPECTED, text)
    config = read_json(folder / CONFIG_NAME)
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise invalid("controlnet", f"a {CLASS_NAME}", f"{text} ({class_name})", ConfigError)
    return ControlNetSource(name, text, kind, folder, revision, config)


def check_fits(controlnet: ControlNetSource, unet_config: Mapping[str, Any]) -> None:
    """ConfigError naming the key where the ControlNet's residuals would not fit the UNet (an SDXL ControlNet on
    an SD 1.5 UNet, say), checked before anything is exported."""
    from diffrt.export.models.controlnet import CONTROLNET_DEFAULTS
    from diffrt.export.models.unet import UNET_DEFAULTS

    for key in MUST_MATCH:
        ours = controlnet.config.get(key, CONTROLNET_DEFAULTS[key])
        theirs = unet_config.get(key, UNET_DEFAULTS[key])
        if _listed(ours) != _listed(theirs):
            raise ConfigError(f"ControlNet {controlnet.id!r} does not fit this UNet: its `{key}` is {ours!r}, the "
                              f"UNet's {theirs!r} (a ControlNet is trained for one base model family)")
    latents = unet_config.get("out_channels", 4)
    if controlnet.config.get("in_channels", 4) != latents:
        raise ConfigError(f"ControlNet {controlnet.id!r} takes {controlnet.config.get('in_channels', 4)}-channel "
                          f"latents; the UNet denoises {latents}")


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def export_controlnets(controlnets: Sequence[ControlNetSource], folder: Path, options: Options,
                       unet_config: Mapping[str, Any], pooled_dim: int | None, aesthetics: bool,
                       rows: Rows) -> dict[str, dict[str, Any]]:
    """Export, validate and describe each ControlNet into `folder`; manifest entries by component name."""
    entries = {}
    for controlnet in controlnets:
        graph = controlnet_graph(controlnet.component, controlnet.path, unet_config, pooled_dim, aesthetics)
        entries[controlnet.component] = export_component(graph, options.precision, folder, options, rows)
        entries[controlnet.component]["source"] = controlnet.manifest()
        seconds, diff = rows[-1][2:]
        logger.info("%s: %s in %.1f s, max abs diff %s", controlnet.component, options.precision, seconds,
                    "not checked" if diff is None else f"{diff:.3g}")
    return entries


def controlnet_index(index: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """model_index.json with the ControlNet components listed and the ControlNet pipeline class."""
    updated = {**index, **{name: list(ONNX_ENTRY) for name in names}}
    updated["_class_name"] = controlnet_class_for(str(index.get("_class_name", "")))
    return updated


def add_controlnets(package: str | Path, controlnets: Sequence[str | Path], *, source: str | Path | None = None,
                    revision: str | None = None, variant: str | None = None, token: str | bool | None = None,
                    overwrite: bool = False, validate: bool = True, tolerance: float | None = None) -> Path:
    """Add ControlNets to a diffrt package in its precision, target and opset.

    A package whose UNet has no residual inputs gets its UNet exported again, from `source` or else from the
    checkpoint its manifest records (the same weights: the manifest's sha256 must match). New folders are written
    to a temporary folder inside the package and renamed into place, then model_index.json and diffrt.json are
    rewritten atomically.
    """
    from diffrt.export.controlnet_unet import reexport_unet, unet_has_residuals

    root = Path(package)
    manifest = _package_manifest(root)
    if manifest.get(DEEP_CACHE_KEY) is not None:
        raise InputError(f"{root} was exported with DeepCache (`--deep-cache`), which does not combine with "
                         "ControlNets (they steer every skip connection at every step); export the checkpoint again "
                         "without --deep-cache to add ControlNets")
    options = check_options(manifest.get("precision", "fp32"), manifest.get("target", "onnxruntime"),
                            manifest.get("opset"), None, validate, tolerance)
    unet_config = read_json(root / "unet" / CONFIG_NAME)
    sources = resolve_controlnets(controlnets, revision, variant, token, unet_config)
    present = [s.component for s in sources if s.component in manifest["components"] or (root / s.component).exists()]
    if present and not overwrite:
        raise invalid("package", f"a package without {present[0]} (pass overwrite=True, or --overwrite, to "
                      "replace it)", str(root))
    for controlnet in sources:
        check_fits(controlnet, unet_config)
    rows: Rows = []
    index = read_json(root / INDEX_NAME)
    pooled, aesthetics = text_time_facts(root)
    remove_stale_temp(root / SCRATCH)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(SCRATCH, "tmp"), dir=root) as scratch:
        entries = {}
        if not unet_has_residuals(manifest["components"]["unet"]):
            entries["unet"] = reexport_unet(manifest, source, Path(scratch), options, rows, token)
        entries.update(export_controlnets(sources, Path(scratch), options, unet_config, pooled, aesthetics, rows))
        for name in entries:
            replace_folder(Path(scratch) / name, root / name)
    names = [s.component for s in sources]
    write_json(root / INDEX_NAME, controlnet_index(index, names))
    manifest["components"].update(entries)
    manifest["pipeline"] = controlnet_class_for(manifest["pipeline"])
    record_component_files(root, manifest["components"], list(entries))
    write_json(root / MANIFEST_NAME, manifest)
    logger.info("added ControlNets %s to %s\n%s", ", ".join(s.name for s in sources), root, summary_table(rows))
    return root


def _package_manifest(root: Path) -> dict[str, Any]:
    from diffrt.export.taesd import package_manifest

    manifest = package_manifest(root)
    if "unet" not in manifest["components"]:
        raise PackageError(f"{root / MANIFEST_NAME} has no `unet` component: a ControlNet steers a package's UNet")
    return manifest
