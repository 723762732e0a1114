"""Whether a preset can be built, exported and benchmarked on this machine, decided before anything is written.

Every model of the preset is constructed on torch's meta device (shapes only, no memory) and counted: values V
per checkpoint folder (parameters and persistent buffers, what `save_pretrained` writes), and the values of what
the package holds (the VAE's decoder half only). From those, with S the checkpoint's bytes per value
(`storage_dtype`) and P the package's (4 for fp32, 2 for fp16 / bf16):

- disk: checkpoint S x V (unless already built) + package P x V(package), twice the package when the engines'
  optimised-model cache is on (ONNX Runtime writes an optimised copy), plus DISK_MARGIN of the free space kept
  free (the disk is shared);
- building: the largest model in float32 (drawn in float32, then cast) + the others in the storage dtype;
- exporting: `diffrt.export.preflight.estimate_memory` of the largest exported component (measured factors);
- benchmarking (CPU, fp32 packages), MEMORY_BASE per process on top (activations come on top: a lower bound):
  `run`, one side at a time (`diffrt bench --one-at-a-time`): the larger of diffrt's float32 package and Diffusers'
  float32 pipeline; `beside`, the sides interleaved (the default): both at once.

A preset that needs more memory than MemAvailable or more disk than is free is refused with every number
(InputError); `DIFFRT_SKIP_MEMORY_CHECK=1` skips the memory checks (not the disk one), as for exports.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from diffrt.bench.presets import Preset, is_current, make_model
from diffrt.errors import InputError
from diffrt.export.preflight import MEMORY_BASE, SKIP_MEMORY_CHECK, available_memory, estimate_memory
from diffrt.package.names import INDEX_NAME

logger = logging.getLogger(__name__)

#: the share of the free disk a preset build leaves free, at least DISK_RESERVE bytes (other jobs write too)
DISK_MARGIN = 0.1
DISK_RESERVE = 1_000_000_000
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}
GB = 1e9


@dataclass(frozen=True)
class Sizes:
    """Values per checkpoint folder (`values`) and per package component (`packaged`)."""

    values: dict[str, int]
    packaged: dict[str, int]


def count_values(preset: Preset) -> Sizes:
    """Values of every model the preset builds, from meta-device models (no weights are allocated)."""
    import torch

    values: dict[str, int] = {}
    packaged: dict[str, int] = {}
    with torch.device("meta"):
        for name in preset.built:
            model = make_model(preset.spec, name, _NoTokenizer())
            # keep_vars: tied weights (T5's shared embedding) are one object, counted once as save_pretrained does
            tensors = {id(t): t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()}
            values[name] = sum(t.numel() for t in tensors.values())
            if name == "vae":
                decoder = [model.decoder, getattr(model, "post_quant_conv", None)]
                packaged["vae_decoder"] = sum(p.numel() for part in decoder if part is not None
                                              for p in part.parameters())
            else:
                packaged[name] = values[name]
            del model
    return Sizes(values, packaged)


class _NoTokenizer:
    """Special-token ids for a CLIP config sized on the meta device (ids do not change any size)."""

    bos_token_id, eos_token_id, pad_token_id = 0, 2, 1


def needs(preset: Preset, sizes: Sizes, precision: str, target: str) -> dict[str, int]:
    """Bytes of disk and memory per phase (see the module docstring)."""
    storage = BYTES[preset.spec.get("storage_dtype", "float32")]
    package_bytes = BYTES.get(precision, 4) * sum(sizes.packaged.values())
    checkpoint_done = (preset.checkpoint / INDEX_NAME).exists()
    disk = (0 if checkpoint_done else storage * sum(sizes.values.values())) + package_bytes
    if preset.spec.get("engine_cache", True):
        disk += package_bytes
    largest = max(sizes.values, key=lambda name: sizes.values[name])
    build = 4 * sizes.values[largest] + storage * (sum(sizes.values.values()) - sizes.values[largest])
    validate = bool(preset.spec.get("export_validate", True))
    export = max(estimate_memory(v, storage * v, validate) for v in sizes.packaged.values())
    # on a GPU (fp16 packages) both sides hold their weights in device memory instead
    sides = (4 * sum(sizes.packaged.values()), 4 * sum(sizes.values.values())) if precision == "fp32" else (0, 0)
    return {"disk": disk, "build": (0 if checkpoint_done else MEMORY_BASE + build), "export": export,
            "run": max(sides) + MEMORY_BASE if any(sides) else 0,
            "beside": sum(sides) + 2 * MEMORY_BASE if any(sides) else 0}


def check_fits(preset: Preset, precision: str = "fp32", target: str = "onnxruntime",
               available: int | None = None, free_disk: int | None = None, beside: bool = False) -> dict[str, int]:
    """The needs of `preset` (bytes); InputError naming each one this machine cannot meet, before anything is
    built (a built package: only the benchmark's memory is checked). `beside`: the benchmark runs diffrt and
    Diffusers at once (interleaved), else one side at a time. `available` / `free_disk` default to MemAvailable
    and the free space of the cache's disk."""
    built = is_current(preset.package(precision, target))
    if built and not beside:
        return {}
    sizes = count_values(preset)
    need = needs(preset, sizes, precision, target)
    if built:
        need.update(disk=0, build=0, export=0)
    if available is None:
        available = available_memory()
    if free_disk is None:
        place = preset.folder
        while not place.exists() and place != place.parent:
            place = place.parent
        free_disk = shutil.disk_usage(place).free
    usable_disk = free_disk - max(DISK_MARGIN * free_disk, DISK_RESERVE)
    logger.info("preset %s: %s; needs %s; %.1f GB of memory available, %.1f GB of disk usable",
                preset.name, _describe(sizes), ", ".join(f"{k} {v / GB:.1f} GB" for k, v in need.items()),
                (available or 0) / GB, usable_disk / GB)
    problems = []
    if need["disk"] > usable_disk:
        problems.append(f"its checkpoint ({preset.spec.get('storage_dtype', 'float32')}) and {precision} package "
                        f"need {need['disk'] / GB:.1f} GB of disk, {usable_disk / GB:.1f} GB is usable "
                        f"({free_disk / GB:.1f} GB free, {DISK_MARGIN:.0%} / {DISK_RESERVE / GB:.0f} GB kept free)")
    skip = os.environ.get(SKIP_MEMORY_CHECK, "").strip() not in ("", "0")
    if available is not None and not skip:
        what = {"build": "drawing its weights (the largest model in float32)",
                "export": "exporting its largest component",
                "run": "benchmarking it (the larger side's float32 weights, before activations)",
                "beside": "benchmarking it beside Diffusers at once (both sides' float32 weights, before "
                          "activations; --one-at-a-time runs one side after the other)"}
        for phase, why in what.items():
            if need[phase] > available and (phase != "beside" or beside):
                problems.append(f"{why} needs {need[phase] / GB:.1f} GB of memory, {available / GB:.1f} GB is "
                                "available")
    if problems:
        unbuilt = preset.spec.get("not_built", {})
        skipped = "".join(f"; {name} is left out already ({why})" for name, why in unbuilt.items())
        done = "it is built, but" if built else "nothing was built:"
        raise InputError(f"preset {preset.name!r} cannot fit this machine, {done} {_describe(sizes)}; "
                         + "; ".join(problems) + skipped + f". Set {SKIP_MEMORY_CHECK}=1 to skip the memory checks "
                         "(swap), or use a machine with more memory and disk")
    return need


def _describe(sizes: Sizes) -> str:
    return ", ".join(f"{name} {values / 1e9:.2f}B values" for name, values in sizes.values.items())

