"""LoRA files -> low-rank updates of Diffusers parameters, torch-free.

Formats read (safetensors only):
- kohya / AUTOMATIC1111: `lora_unet_<module>` / `lora_te_<module>` (SD) / `lora_te1_` + `lora_te2_` (SDXL) with
  `.lora_down.weight`, `.lora_up.weight` and an optional `.alpha` (scale alpha / rank); the module is the Diffusers
  (or transformers) module path with `.` written `_`. LoCon / LyCORIS conv layers in the same plain low-rank form
  (down [r, in, k, k], up [out, r, 1, 1]) are read too.
- Diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `text_encoder.`, `text_encoder_2.`, and
  the older `.lora.down` / `.lora.up` names); lora_alpha from the file's `lora_adapter_metadata` (as Diffusers'
  `save_lora_weights` writes it), else from `.alpha` keys, else the rank (scale 1).
LyCORIS's other algorithms (LoHa, LoKr, Tucker `lora_mid`, DoRA) are not plain low-rank: a clear error names them.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from diffrt.errors import InputError
from diffrt.package.weights import canonical_parameter
from diffrt.runtime.adapters.safetensors_file import read_safetensors

logger = logging.getLogger(__name__)

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder_2.": "text_encoder_2", "text_encoder.": "text_encoder"}
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
         ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
         ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up"}
UNSUPPORTED = {".lora_mid.": "LoCon Tucker (lora_mid)", ".hada_": "LyCORIS LoHa", ".lokr_": "LyCORIS LoKr",
               ".dora_scale": "DoRA", ".magnitude_vector": "DoRA", "lora_magnitude_vector": "DoRA"}
METADATA_KEY = "lora_adapter_metadata"  # Diffusers' save_lora_weights: the PEFT config per component
EXAMPLES = 5  # unmatched keys named in an error


@dataclass(frozen=True)
class LoraUpdate:
    """`scale * up @ down` added to one parameter (as an [out, in * kh * kw] matrix)."""

    component: str
    parameter: str
    down: np.ndarray
    up: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraFile:
    path: Path
    updates: tuple[LoraUpdate, ...]

    @property
    def components(self) -> set[str]:
        return {update.component for update in self.updates}


def read_lora(path: Path, parameters: Mapping[str, set[str]], strict: bool = True,
              layers_per_block: int | None = None) -> LoraFile:
    """The updates in the LoRA file `path`, keyed onto `parameters` ({component: its mapped parameter names}).
    `layers_per_block` (the UNet config's) reads kohya files in the original SGM block names (SDXL trainers).

    Keys that match no parameter of the package: InputError listing a few, or (strict=False) a warning with their
    count, those keys skipped."""
    tensors, metadata = read_safetensors(path)
    _refuse_unsupported(path, tensors)
    groups, unknown = _group(tensors)
    alphas = _metadata_alphas(metadata)
    lookup = {component: _module_lookup(names) for component, names in parameters.items()}
    updates, unmatched = [], list(unknown)
    for (component, module, kohya), roles in sorted(groups.items()):
        parameter = _resolve(lookup.get(component), component, module, kohya)
        if parameter is None and kohya and component == "unet" and layers_per_block is not None:
            parameter = _resolve(lookup.get(component), component, sgm_to_diffusers(module, layers_per_block), kohya)
        if parameter is None or "down" not in roles or "up" not in roles:
            unmatched.append(str(roles.get("key", module)))
            continue
        down, up = roles["down"], roles["up"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise InputError(f"{path}: {module}: lora up {tuple(up.shape)} and down {tuple(down.shape)} disagree on "
                             "the rank")
        alpha = _alpha(roles, alphas, component, module, rank)
        rslora = alphas.get((component, "use_rslora"), False)
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        updates.append(LoraUpdate(component, parameter, down, up, float(scale)))
    if unmatched:
        _report_unmatched(path, unmatched, strict)
    if not updates:
        raise InputError(f"{path} holds no LoRA weights diffrt can apply to this package")
    logger.info("%s: %d LoRA updates (%s)", path.name, len(updates), ", ".join(sorted({u.component for u in updates})))
    return LoraFile(path, tuple(updates))


def _refuse_unsupported(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    for key in tensors:
        for marker, kind in UNSUPPORTED.items():
            if marker in key:
                raise InputError(f"{path} is a {kind} adapter (key {key!r}): diffrt applies plain low-rank LoRA / "
                                 "LoCon only")


def _group(tensors: Mapping[str, np.ndarray]) -> tuple[dict[tuple[str, str, bool], dict], list[str]]:
    """{(component, module, kohya naming): {"down"/"up"/"alpha": array, "key": a key}}, and the keys not LoRA."""
    groups: dict[tuple[str, str, bool], dict] = defaultdict(dict)
    unknown = []
    has_prefix = any(key.startswith(tuple(PEFT_PREFIXES) + tuple(KOHYA_PREFIXES)) for key in tensors)
    for key, value in tensors.items():
        role = next((r for suffix, r in ROLES.items() if key.endswith(suffix)), None)
        if role is None:
            unknown.append(key)
            continue
        stem = key[: -len(next(s for s in ROLES if key.endswith(s)))].removeprefix("base_model.model.")
        kohya = next((p for p in KOHYA_PREFIXES if stem.startswith(p)), None)
        peft = next((p for p in PEFT_PREFIXES if stem.startswith(p)), None)
        if kohya is not None:
            place = (KOHYA_PREFIXES[kohya], stem[len(kohya):], True)
        elif peft is not None:
            place = (PEFT_PREFIXES[peft], stem[len(peft):], False)
        elif not has_prefix:  # a bare PEFT UNet state dict (Diffusers reads those as the UNet's too)
            place = ("unet", stem, False)
        else:
            unknown.append(key)
            continue
        groups[place][role] = value
        groups[place].setdefault("key", key)
    return groups, unknown


def _module_lookup(names: set[str]) -> dict[str, str]:
    """kohya module name (dots as underscores) -> the parameter `<module>.weight`."""
    return {name.removesuffix(".weight").replace(".", "_"): name for name in names if name.endswith(".weight")}


def _resolve(lookup: dict[str, str] | None, component: str, module: str, kohya: bool) -> str | None:
    if lookup is None:
        return None
    if kohya:
        return lookup.get(module)
    parameter = canonical_parameter(component, module) + ".weight"
    return parameter if parameter in lookup.values() else None


# The original (SGM / LDM) UNet's names -> Diffusers': blocks by position, resnet layers by role.
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_OTHER = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding_linear_1",
              "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
              "label_emb_0_2": "add_embedding_linear_2"}


def sgm_to_diffusers(module: str, layers_per_block: int) -> str:
    """`input_blocks_4_1_transformer_blocks_0_attn1_to_q` -> `down_blocks_1_attentions_0_transformer_blocks_0_...`
    (kohya's SDXL names, underscored), as Diffusers' own kohya loader maps them."""
    if module in _SGM_OTHER:
        return _SGM_OTHER[module]
    stride = layers_per_block + 1
    middle = _SGM_MIDDLE.match(module)
    if middle:
        index, rest = int(middle.group(1)), middle.group(2)
        part = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}.get(index)
        return f"mid_block_{part}_{_SGM_RESNET.get(rest, rest)}" if part else module
    block = _SGM_BLOCK.match(module)
    if not block:
        return module
    kind, index, inner, rest = block.group(1), int(block.group(2)), int(block.group(3)), block.group(4)
    rest = _SGM_RESNET.get(rest, rest)
    if kind == "input_blocks":
        level, layer = divmod(index - 1, stride)
        if rest.startswith("op"):  # the downsampling convolution
            return f"down_blocks_{level}_downsamplers_0_conv{rest[2:]}"
        return f"down_blocks_{level}_{('resnets', 'attentions')[min(inner, 1)]}_{layer}_{rest}"
    level, layer = divmod(index, stride)
    if inner == 2 or rest.startswith("conv") and inner == 1 and not rest.startswith(("conv1", "conv2")):
        return f"up_blocks_{level}_upsamplers_0_{rest}"
    return f"up_blocks_{level}_{('resnets', 'attentions')[inner]}_{layer}_{rest}"


def _metadata_alphas(metadata: Mapping[str, str]) -> dict[tuple[str, str], object]:
    """{(component, "lora_alpha" | "use_rslora" | "alpha_pattern"): value} from Diffusers' adapter metadata."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s in the LoRA file's metadata", METADATA_KEY)
        return {}
    found: dict[tuple[str, str], object] = {}
    for key, value in config.items():
        prefix, _, field = key.partition(".")
        if field in ("lora_alpha", "use_rslora", "alpha_pattern"):
            found[(prefix, field)] = value
    return found


def _alpha(roles: dict, alphas: dict[tuple[str, str], object], component: str, module: str, rank: int) -> float:
    if "alpha" in roles:
        return float(np.asarray(roles["alpha"]).reshape(-1)[0])
    pattern = alphas.get((component, "alpha_pattern")) or {}
    for key, value in dict(pattern).items():  # type: ignore[call-overload]
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return float(value)
    configured = alphas.get((component, "lora_alpha"))
    return float(configured) if isinstance(configured, (int, float)) else float(rank)


def _report_unmatched(path: Path, unmatched: list[str], strict: bool) -> None:
    shown = ", ".join(unmatched[:EXAMPLES]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > EXAMPLES else "")
    if strict:
        raise InputError(f"{path}: {len(unmatched)} keys match no weight of this package: {shown}. Is the LoRA for "
                         "another model family (SD 1.x vs SDXL)? Pass strict=False to load the rest with a warning")
    logger.warning("%s: skipped %d keys that match no weight of this package (%s)", path, len(unmatched), shown)
