"""Type and range checks of the component configs the runtime reads, and their agreement with the graphs.

A damaged or hand-edited config.json fails when the package is opened, naming the file and the key, instead of
giving a wrong image later: a VAE `scaling_factor` of 0 decodes to an all-NaN (black) image, and a changed
`block_out_channels` silently changes the output size. Only keys the runtime uses are checked; keys a config lacks
keep the defaults the runtime applies (Diffusers' own).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffrt.errors import PackageError
from diffrt.package.specs import DimRanges

Shape = Sequence[int | str | None] | None
IOShapes = Mapping[str, Shape]  # input / output name -> its shape in the graph
# Optimum names the VAE's derived sizes by their expression: "latent_height * 8", "sample_height / 8".
_SCALED_DIM = re.compile(r"^\s*\w+\s*[*/]\s*(\d+)\s*$")


def check_component_config(name: str, config: Mapping[str, Any], config_path: Path, io: IOShapes,
                           dims: DimRanges) -> None:
    """Check component `name`'s config (read from `config_path`) against its graph's shapes `io` and `dims`."""
    where = str(config_path)
    if name.startswith(("vae_decoder", "vae_encoder")):
        _check_vae(name, config, where, io, dims)
    elif name == "unet":
        _check_unet(config, where, io)
    elif name.startswith("text_encoder"):
        _positive_int(config, "hidden_size", where)
        _agrees(config.get("hidden_size"), "`hidden_size`", where, io, "last_hidden_state", 2)


def _check_vae(name: str, config: Mapping[str, Any], where: str, io: IOShapes, dims: DimRanges) -> None:
    scaling = _number(config, "scaling_factor", where, positive=True)
    _number(config, "shift_factor", where)
    latent = _positive_int(config, "latent_channels", where)
    blocks = config.get("block_out_channels")
    if blocks is not None and (not isinstance(blocks, list) or not blocks
                               or not all(_is_int(b) and b > 0 for b in blocks)):
        raise PackageError(f"{where}: `block_out_channels` must be a non-empty list of positive integers; "
                           f"got {blocks!r}")
    for key in ("latents_mean", "latents_std"):
        _channel_list(config, key, where, latent, positive=key == "latents_std")
    tiny = name.endswith("_tiny")
    if name.startswith("vae_decoder"):
        _agrees(latent, "`latent_channels`", where, io, "latent_sample", 1)
    elif not tiny:  # mean and log-variance per latent channel
        _agrees(2 * latent if latent else None, "2 x `latent_channels`", where, io, "latent_parameters", 1)
    if blocks and not tiny and scaling is not None:
        _check_scale_factor(2 ** (len(blocks) - 1), where, io, dims)


def _check_scale_factor(factor: int, where: str, io: IOShapes, dims: DimRanges) -> None:
    """The VAE's size factor (2 ** (len(block_out_channels) - 1)) is the one the graph was exported with."""
    exported = None
    if "height" in dims and "latent_height" in dims and dims["latent_height"][1] > 0:
        exported = dims["height"][1] // dims["latent_height"][1]
    for shape in io.values():
        for dim in shape or ():
            match = _SCALED_DIM.match(dim) if isinstance(dim, str) else None
            if match:
                exported = int(match.group(1))
    if exported is not None and exported != factor:
        raise PackageError(f"{where}: `block_out_channels` gives a size factor of {factor} (2 ** (len - 1)), but the "
                           f"graph was exported with factor {exported}: the config does not belong to this model")


def _check_unet(config: Mapping[str, Any], where: str, io: IOShapes) -> None:
    _positive_int(config, "in_channels", where)
    _positive_int(config, "out_channels", where)
    _agrees(config.get("in_channels"), "`in_channels`", where, io, "sample", 1)
    _agrees(config.get("out_channels"), "`out_channels`", where, io, "out_sample", 1)
    size = config.get("sample_size")
    sizes: list[Any] = size if isinstance(size, list) else [size]
    if size is not None and (not sizes or not all(_is_int(s) and s > 0 for s in sizes)):
        raise PackageError(f"{where}: `sample_size` must be a positive integer (or a list of them); got {size!r}")
    cross = config.get("cross_attention_dim")
    if isinstance(cross, list):
        cross = cross[0] if cross and all(c == cross[0] for c in cross) else None
    if cross is not None:
        _agrees(cross, "`cross_attention_dim`", where, io, "encoder_hidden_states", 2)


# ----- value checks -----
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(config: Mapping[str, Any], key: str, where: str, positive: bool = False) -> float | None:
    value = config.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        bound = "a finite number > 0" if positive else "a finite number (or null)"
        raise PackageError(f"{where}: `{key}` must be {bound}; got {value!r}")
    return float(value)


def _positive_int(config: Mapping[str, Any], key: str, where: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if not _is_int(value) or value <= 0:
        raise PackageError(f"{where}: `{key}` must be a positive integer; got {value!r}")
    return int(value)


def _channel_list(config: Mapping[str, Any], key: str, where: str, channels: int | None, positive: bool) -> None:
    value = config.get(key)
    if value is None:
        return
    numbers = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value)
    if not numbers or (channels is not None and len(value) != channels):
        size = f"{channels} " if channels is not None else ""
        kind = "positive finite numbers" if positive else "finite numbers"
        raise PackageError(f"{where}: `{key}` must be null or a list of {size}{kind} (one per latent channel); "
                           f"got {value!r}")


def _agrees(value: Any, label: str, where: str, io: IOShapes, tensor: str, axis: int) -> None:
    """`value` (the config's `label`) equals dimension `axis` of graph tensor `tensor`, where both are known."""
    shape = io.get(tensor)
    if value is None or not shape or not -len(shape) <= axis < len(shape):
        return
    dim = shape[axis]
    if _is_int(dim) and dim != value:
        raise PackageError(f"{where}: {label} gives {value}, but the graph's `{tensor}` has {dim} in dimension "
                           f"{axis % len(shape)}: the config does not belong to this model")
