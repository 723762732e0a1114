"""The tiny autoencoder (TAESD / TAESDXL, diffusers' `AutoencoderTiny`) as optional package components.

`vae_decoder_tiny` (`latent_sample` -> `sample`) and `vae_encoder_tiny` (`sample` -> `latents`) sit beside the full
VAE; the runtime uses them with `vae="tiny"`. They are exported with the package (`export_pipeline(...,
tiny_vae=SOURCE)`) or added to an existing one (`add_tiny_vae(package, SOURCE)`), in the package's precision and
opset. TAESD decodes the diffusion latents directly (its `scaling_factor` is 1.0) and its encoder returns latents,
not a distribution, so the encoder output is named `latents` rather than `latent_parameters`.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from diffrt.errors import ConfigError, ExportError, InputError, PackageError, invalid
from diffrt.export.checkpoint import REPO_ID
from diffrt.export.component import Options, Rows, check_options, export_component, summary_table
from diffrt.export.onnx import autoencoder_graph
from diffrt.export.precision import component_precision
from diffrt.package.files import files_sha256, read_json, replace_folder, write_json
from diffrt.package.leftovers import remove_stale_temp, temp_prefix
from diffrt.package.names import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, ONNX_ENTRY
from diffrt.package.writer import record_component_files
from diffrt.runtime.hub import hub_snapshot

__all__ = ["TINY_COMPONENTS", "TinyVaeSource", "add_tiny_vae", "resolve_tiny_vae"]

logger = logging.getLogger(__name__)

# full VAE component -> its tiny counterpart; the encoder is written only where the package has the full one
TINY_COMPONENTS = {"vae_decoder": "vae_decoder_tiny", "vae_encoder": "vae_encoder_tiny"}
CLASS_NAME = "AutoencoderTiny"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SCRATCH = "tiny_vae"  # `.tiny_vae.tmp-PID@HOST-*` inside the package while the components are exported
EXPECTED = f"an {CLASS_NAME} folder ({CONFIG_NAME} + {WEIGHTS_FILE}) or a Hub repo id (owner/name)"


@dataclass(frozen=True)
class TinyVaeSource:
    """A resolved tiny VAE: a local folder holding config.json and the safetensors weights."""

    id: str
    kind: str  # "folder" | "hub"
    path: Path
    revision: str | None  # Hub: the commit the files come from
    config: dict[str, Any]

    def manifest(self) -> dict[str, Any]:
        """What each tiny component's manifest entry records as its `source`."""
        digest = files_sha256([self.path / WEIGHTS_FILE])
        return {"id": self.id, "kind": self.kind, "revision": self.revision, "weights_sha256": {WEIGHTS_FILE: digest}}


def resolve_tiny_vae(source: str | Path, revision: str | None = None,
                     token: str | bool | None = None) -> TinyVaeSource:
    """A local AutoencoderTiny folder or Hub repo id (fetched like other Hub sources: cache, HF_HUB_OFFLINE)."""
    if not isinstance(source, (str, Path)) or not str(source):
        raise invalid("tiny_vae", EXPECTED, source)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise invalid("revision", "None for a local tiny VAE folder (it applies to Hub repo ids)", revision)
        return _from_folder(path.resolve(), text, "folder", None)
    if path.exists() or not REPO_ID.match(text):
        raise invalid("tiny_vae", EXPECTED, text)
    try:
        folder = hub_snapshot(text, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_FILE], token=token,
                              purpose=f"the {CLASS_NAME} files", error=ExportError)
    except ExportError as error:
        raise InputError(f"`tiny_vae`: {error}") from error
    return _from_folder(folder, text, "hub", folder.name)


def _from_folder(folder: Path, text: str, kind: str, revision: str | None) -> TinyVaeSource:
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise invalid("tiny_vae", EXPECTED, text)
    config = read_json(folder / CONFIG_NAME)
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise invalid("tiny_vae", f"an {CLASS_NAME} (TAESD) model", f"{text} ({class_name})", ConfigError)
    return TinyVaeSource(text, kind, folder, revision, config)


def _scale_factor(config: Mapping[str, Any]) -> int:
    """Pixels per latent: the encoder halves each side per stage after the first, the decoder upsamples back."""
    from diffrt.export.models.tiny_vae import TINY_VAE_DEFAULTS

    full = {**TINY_VAE_DEFAULTS, **config}
    encoder = 2 ** (len(full["encoder_block_out_channels"]) - 1)
    decoder = full["upsampling_scaling_factor"] ** (len(full["decoder_block_out_channels"]) - 1)
    if encoder != decoder:
        raise ConfigError(f"`tiny_vae` encoder downsamples by {encoder} but its decoder upsamples by {decoder}")
    return encoder


def check_fits(tiny: TinyVaeSource, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> None:
    """ConfigError naming `tiny_vae` when its latents are not the package's (channels, or pixels per latent)."""
    channels = tiny.config.get("latent_channels", 4)
    # The UNet denoises out_channels latents; an inpainting UNet's in_channels (9) also counts the mask and the
    # masked-image latents, so in_channels is not the latent width.
    expected = unet_config.get("out_channels", vae_config.get("latent_channels"))
    if expected is not None and channels != expected:
        raise ConfigError(f"`tiny_vae` must have latent_channels {expected} (the package's latents, as the UNet "
                          f"denoises them); {tiny.id} has {channels}")
    factor = _scale_factor(tiny.config)
    if "block_out_channels" in vae_config:
        full = 2 ** (len(vae_config["block_out_channels"]) - 1)
        if factor != full:
            raise ConfigError(f"`tiny_vae` must map one latent to {full}x{full} pixels like the package's VAE; "
                              f"{tiny.id} maps it to {factor}x{factor}")


def tiny_names(has_encoder: bool) -> list[str]:
    return [TINY_COMPONENTS["vae_decoder"]] + ([TINY_COMPONENTS["vae_encoder"]] if has_encoder else [])


def export_tiny_components(tiny: TinyVaeSource, names: list[str], folder: Path, options: Options,
                           pipeline_class: str, rows: Rows) -> dict[str, dict[str, Any]]:
    """Export, validate and describe each of `names` (tiny components) into `folder`; manifest entries by name."""
    import torch

    from diffrt.export.models import AutoencoderTiny

    source = tiny.manifest()
    entries = {}
    for name in names:
        # One model per component: reduced-precision export converts the module in place.
        model = AutoencoderTiny.from_pretrained(tiny.path, dtype=torch.float32)
        version = {key: tiny.config[key] for key in ("_diffusers_version",) if key in tiny.config}
        config = {"_class_name": CLASS_NAME, **version, **model.config}
        precision = component_precision(name, options.precision, pipeline_class, config)
        entries[name] = export_component(autoencoder_graph(name, model, None), precision, folder, options, rows)
        entries[name]["source"] = source
        # The resolved config (every default filled in), so the runtime never guesses TAESD's scaling_factor.
        write_json(folder / name / CONFIG_NAME, config)
        seconds, diff = rows[-1][2:]
        logger.info("%s: %s in %.1f s, max abs diff %s", name, precision, seconds,
                    "not checked" if diff is None else f"{diff:.3g}")
    return entries


def package_manifest(root: Path) -> dict[str, Any]:
    """The diffrt.json of the package folder `root` (InputError / PackageError when it is not one)."""
    if not (root / MANIFEST_NAME).is_file():
        raise invalid("package", f"a diffrt model package folder (with {MANIFEST_NAME})", str(root))
    manifest = read_json(root / MANIFEST_NAME)
    if not isinstance(manifest.get("components"), dict) or not isinstance(manifest.get("pipeline"), str):
        raise PackageError(f"{root / MANIFEST_NAME} has no `components` / `pipeline`: not a diffrt package manifest")
    return manifest


def _component_config(root: Path, *names: str) -> dict[str, Any]:
    for name in names:
        if (root / name / CONFIG_NAME).is_file():
            return read_json(root / name / CONFIG_NAME)
    return {}


def add_tiny_vae(package: str | Path, source: str | Path, *, revision: str | None = None,
                 token: str | bool | None = None, precision: str | None = None, overwrite: bool = False,
                 validate: bool = True, tolerance: float | None = None) -> Path:
    """Add `vae_decoder_tiny` (and `vae_encoder_tiny` where the package has a `vae_encoder`) to a diffrt package.

    `source` is an AutoencoderTiny folder or Hub repo id (`revision` / `token` apply to it). The components are
    exported in the package's precision (or `precision`), target and opset, written to a temporary folder inside
    the package, renamed into place, and then model_index.json and diffrt.json are rewritten atomically.
    """
    root = Path(package)
    manifest = package_manifest(root)
    options = check_options(precision or manifest.get("precision", "fp32"), manifest.get("target", "onnxruntime"),
                            manifest.get("opset"), None, validate, tolerance)
    names = tiny_names("vae_encoder" in manifest["components"])
    present = [name for name in names if name in manifest["components"] or (root / name).exists()]
    if present and not overwrite:
        raise invalid("package", f"a package without {present[0]} (pass overwrite=True, or --overwrite, to "
                      "replace it)", str(root))
    tiny = resolve_tiny_vae(source, revision, token)
    check_fits(tiny, _component_config(root, "unet"), _component_config(root, "vae_decoder", "vae_encoder"))
    rows: Rows = []
    remove_stale_temp(root / SCRATCH)  # additions killed earlier
    with tempfile.TemporaryDirectory(prefix=temp_prefix(SCRATCH, "tmp"), dir=root) as scratch:
        entries = export_tiny_components(tiny, names, Path(scratch), options, manifest["pipeline"], rows)
        for name in names:
            replace_folder(Path(scratch) / name, root / name)
    index = read_json(root / INDEX_NAME) if (root / INDEX_NAME).is_file() else {}
    write_json(root / INDEX_NAME, {**index, **{name: list(ONNX_ENTRY) for name in names}})
    manifest["components"].update(entries)
    record_component_files(root, manifest["components"], names)
    write_json(root / MANIFEST_NAME, manifest)
    logger.info("added the tiny VAE %s to %s\n%s", tiny.id, root, summary_table(rows))
    return root
