"""A pipeline's adapters: the LoRA files loaded, which are active at which weights, what is fused, the textual
inversion rows; and, per component, the initializer overrides they amount to.

Everything is computed in NumPy from the package's own weights: a component's override is
`base + sum(weight * scale * up @ down)` for the parameters the active (and fused) LoRAs touch, in the layout and
dtype the initializer has (`merge.merged_weight`: one float32 GEMM per parameter, whatever the number of adapters).
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
from diffrt.runtime.adapters.merge import merged_weight
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

    def overrides(self, component: str) -> dict[str, np.ndarray]:
        """{initializer name: new value} for `component`; {} when nothing applies to it."""
        terms: dict[str, list[tuple[LoraUpdate, float]]] = defaultdict(list)
        source = parameter_source(component)
        for lora, weight in self.contributions(component):
            for update in lora.updates:
                if update.component == source:
                    terms[update.parameter].append((update, weight))
        placements = self.weights.placements(component) if terms or self.token_rows.get(component) else {}
        result: dict[str, np.ndarray] = {}
        for parameter, parameter_terms in terms.items():
            # a partial graph (DeepCache's shallow UNet) holds only some of its source's parameters
            for place in placements.get(parameter, ()):
                base = self.weights.base(component, place.initializer)
                result[place.initializer] = merged_weight(base, place.layout, parameter_terms,
                                                          f"{component} {parameter}")
        rows = self.token_rows.get(component)
        if rows and rows.tokens:
            result.update(self._embedding_override(component, rows, placements))
        return result

    def _embedding_override(self, component: str, rows: TokenRows, placements: Mapping) -> dict[str, np.ndarray]:
        from diffrt.runtime.adapters.textual_inversion import TOKEN_EMBEDDING

        found = {}
        for place in placements[TOKEN_EMBEDDING]:
            base = self.weights.base(component, place.initializer)
            table = base.reshape(base.shape[0], -1) if place.layout == "direct" else base.T
            extra = np.stack(rows.vectors).astype(table.dtype)
            grown = np.concatenate([table, extra], axis=0)
            found[place.initializer] = np.ascontiguousarray(grown if place.layout == "direct" else grown.T)
        return found
