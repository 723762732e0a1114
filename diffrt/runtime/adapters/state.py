"""A pipeline's adapters: the LoRA files loaded, which are active at which weights, what is fused, the textual
inversion rows; and, per component, the initializer overrides they amount to.

Everything is computed in NumPy from the package's own weights: a component's override is
`base + sum(weight * scale * up @ down)` for the parameters the active (and fused) LoRAs touch, in the layout and
dtype the initializer has (`merge.merged_weight`: one float32 GEMM per parameter, whatever the number of adapters),
computed when an engine reads it (`overrides.Overrides`).
A component with nothing applied has no override, so its engine is the plain package one, bit for bit (what
`unload_lora_weights` returns to).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Mapping

import numpy as np

from diffrt.runtime.adapters.lora_file import LoraFile, LoraUpdate
from diffrt.runtime.adapters.overrides import Overrides
from diffrt.runtime.adapters.package_weights import PackageWeights, parameter_source

logger = logging.getLogger(__name__)

#: an adapter's weight: one number, or one per component ({"unet": 0.5, "text_encoder": 1.0}), as in Diffusers
Weight = float | Mapping[str, float]


def component_weight(weight: Weight, component: str) -> float:
    if isinstance(weight, Mapping):
        return float(weight.get(component, 1.0))
    return float(weight)


@dataclass
class TokenRows:
    """Textual-inversion rows appended to a text encoder's token embedding (ids from the vocabulary's end)."""

    tokens: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)


class AdapterState:
    def __init__(self, weights: PackageWeights) -> None:
        self.weights = weights
        self.loras: dict[str, LoraFile] = {}
        self.active: list[tuple[str, Weight]] = []
        self.enabled = True
        self.fused: list[tuple[LoraFile, str, float]] = []  # (file, adapter name, weight) baked into the base
        self.token_rows: dict[str, TokenRows] = defaultdict(TokenRows)

    # ----- what is applied -----
    def contributions(self, component: str) -> list[tuple[LoraFile, float]]:
        source = parameter_source(component)
        applied = [(lora, weight) for lora, _, weight in self.fused if source in lora.components]
        if self.enabled:
            fused_names = {name for _, name, _ in self.fused}
            for name, weight in self.active:
                lora = self.loras[name]
                if source in lora.components and name not in fused_names:
                    applied.append((lora, component_weight(weight, source)))
        return [(lora, weight) for lora, weight in applied if weight != 0.0]

    def signature(self, component: str) -> Hashable:
        """Changes exactly when the component's override does (decides which engines to re-create)."""
        rows = self.token_rows.get(component)
        return (tuple((id(lora), weight) for lora, weight in self.contributions(component)),
                tuple(rows.tokens) if rows else ())

    def overrides(self, component: str) -> Overrides:
        """{initializer name: new value} for `component` as applied now ({} when nothing applies to it); each value
        is computed when read (`Overrides`), so an engine holds the merged weights only inside its session."""
        terms: dict[str, list[tuple[LoraUpdate, float]]] = defaultdict(list)
        source = parameter_source(component)
        for lora, weight in self.contributions(component):
            for update in lora.updates:
                if update.component == source:
                    terms[update.parameter].append((update, weight))
        rows = self.token_rows.get(component)
        return Overrides.plan(self.weights, component, terms, list(rows.vectors) if rows and rows.tokens else [])
