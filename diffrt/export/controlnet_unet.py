"""The UNet of a package that gains ControlNets (`add_controlnets`): exported again with residual inputs.

ONNX graphs cannot be given new inputs after the fact without re-tracing, so the UNet is exported again from its
checkpoint: `source` when given, else the one the manifest records (a local folder or Hub repo id at the recorded
revision). The weights must be the package's own: their sha256 is compared with the manifest's record first.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from diffrt.errors import ExportError, InputError
from diffrt.export.component import Options, Rows, export_component
from diffrt.export.controlnet_graph import add_residual_inputs, text_time_facts
from diffrt.export.onnx import unet_graph
from diffrt.package.names import UNET_MID_RESIDUAL

logger = logging.getLogger(__name__)


def unet_has_residuals(entry: Mapping[str, Any]) -> bool:
    """Whether a UNet manifest entry takes ControlNet residuals."""
    return any(spec.get("name") == UNET_MID_RESIDUAL for spec in entry.get("inputs", []))


def reexport_unet(manifest: Mapping[str, Any], source: str | Path | None, folder: Path, options: Options,
                  rows: Rows, token: str | bool | None) -> dict[str, Any]:
    """Export the package's UNet with residual inputs into `folder/unet`; its manifest entry."""
    from diffrt.export.checkpoint import resolve_source

    recorded = manifest.get("source") or {}
    given = source if source is not None else recorded.get("id")
    if not given or recorded.get("kind") == "single_file" and source is None:
        raise InputError("this package's UNet takes no ControlNet residuals, so it must be exported again: pass the "
                         "checkpoint it was exported from (`source`, or SOURCE before --into)")
    revision = recorded.get("revision") if source is None and recorded.get("kind") == "hub" else None
    logger.info("the package's UNet takes no ControlNet residuals: exporting it again from %s", given)
    try:
        src = resolve_source(given, revision=revision, token=token)
    except ExportError as error:
        raise InputError(f"`source`: {error}") from error
    _check_same_weights(src, recorded.get("weights_sha256") or {})
    root: Path = src.path
    graph = add_residual_inputs(unet_graph(root, src.variant, *text_time_facts(root)))
    return export_component(graph, options.precision, folder, options, rows)


def _check_same_weights(src: Any, recorded: Mapping[str, str]) -> None:
    """ExportError unless the checkpoint's UNet weights are the ones the package was exported from."""
    unet = {rel: digest for rel, digest in recorded.items() if rel.split("/")[0] == "unet"}
    if not unet:
        logger.warning("the package records no UNet weight hashes: cannot check that %s is its checkpoint", src.id)
        return
    found = {rel: digest for rel, digest in src.weights_sha256().items() if rel in unet}
    if found != unet:
        raise InputError(f"`source`: the UNet weights of {src.id} are not the ones this package was exported from "
                         "(their sha256 differs from the manifest's); pass the package's own checkpoint")
