"""Which ONNX initializer holds each Diffusers parameter of an exported component (the manifest's `parameters`).

The runtime applies LoRA and textual-inversion deltas to a package's weights without torch: it needs to know, for a
Diffusers parameter name such as `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight`, which
initializer of `model.onnx` holds it and in which layout. The exporter renames and rewrites weights (a Linear weight
used by MatMul is constant-folded into its transpose, named `val_123`), so names alone do not say it; contents do.
Each parameter is matched by an exact content digest of its bytes as stored (after the precision conversion), as is
and as the transpose of its [out, in] matrix. A digest shared by several parameters (a fresh LayerNorm's ones) is
ambiguous and left out: nothing is recorded that is not certain.
"""
from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from diffrt.package.weights import LAYOUT_DIRECT, LAYOUT_TRANSPOSED, canonical_parameter

logger = logging.getLogger(__name__)

Key = tuple[str, int, bytes]  # (dtype, element count, digest)


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _tensor_keys(tensor: torch.Tensor) -> list[tuple[Key, str]]:
    """Digests of `tensor` as stored directly and, for a matrix (or a 1x1 conv kernel), stored transposed."""
    tensor = tensor.detach().cpu()
    dtype = str(tensor.dtype).removeprefix("torch.")
    raw = tensor.contiguous().view(torch.uint8).numpy()
    keys = [((dtype, tensor.numel(), _digest(raw.data)), LAYOUT_DIRECT)]
    if tensor.ndim == 2 or (tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1)):
        flipped = tensor.reshape(tensor.shape[0], -1).T.contiguous().view(torch.uint8).numpy()
        keys.append(((dtype, tensor.numel(), _digest(flipped.data)), LAYOUT_TRANSPOSED))
    return keys


def _initializer_key(value: Any) -> Key | None:
    """An onnx_ir Value's (or a NumPy array's, from `diffrt.package.weights.read_initializers`) digest key."""
    if isinstance(value, np.ndarray):
        array = value  # bfloat16 is read as its uint16 bits: such packages do not match here
    else:
        if value.const_value is None:
            return None
        array = value.const_value.numpy()
    return str(array.dtype), int(array.size), _digest(np.ascontiguousarray(array).view(np.uint8).data)


def parameter_map(component: str, root: nn.Module, initializers: Mapping[str, Any]) -> dict[str, list[list[str]]]:
    """{Diffusers parameter name: [[initializer name, layout], ...]} for the floating-point parameters of `root`
    found in `initializers` (an onnx_ir graph's initializers, or NumPy arrays by name), layouts `direct` /
    `transposed`."""
    candidates: dict[Key, list[tuple[str, str]]] = defaultdict(list)
    for name, parameter in root.named_parameters(remove_duplicate=False):
        if not parameter.is_floating_point():
            continue
        name = canonical_parameter(component, name)
        for key, layout in _tensor_keys(parameter):
            candidates[key].append((name, layout))
    found: dict[str, list[list[str]]] = defaultdict(list)
    ambiguous: set[str] = set()
    for initializer, value in initializers.items():
        found_key = _initializer_key(value)
        if found_key is None or found_key not in candidates:
            continue
        matches = candidates[found_key]
        if len({name for name, _ in matches}) > 1:  # same bytes in several parameters: which one is unknowable
            ambiguous.update(name for name, _ in matches)
            continue
        name, layout = matches[0]
        found[name].append([initializer, layout])
    for name in ambiguous:
        found.pop(name, None)
    total = sum(1 for _, p in root.named_parameters() if p.is_floating_point())
    logger.info("%s: %d of %d parameters located among the ONNX initializers (%d with ambiguous contents)",
                component, len(found), total, len(ambiguous))
    return {name: found[name] for name in sorted(found)}
