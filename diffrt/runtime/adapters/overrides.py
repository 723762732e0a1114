"""A component's initializer overrides as a mapping whose values are computed when read.

Why lazy: an engine reads each override once, when it creates its session, and ONNX Runtime copies what it is given
through `add_external_initializers` (measured: writing to the array afterwards changes nothing). An eager dict kept
by the engine for re-creating its session held every merged weight a second time, beside the session's own copy:
about 1 GiB per SD 1.5 UNet LoRA variant (docs/benchmarks.md, "Sharing weights between sessions"). The mapping
keeps what the merge is computed from instead (the adapters' factors and the package's memory-mapped base weights),
snapshotted when it is made, so a session created from it later gets the same values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from diffrt.runtime.adapters.lora_file import LoraUpdate
from diffrt.runtime.adapters.merge import merged_weight
from diffrt.runtime.adapters.package_weights import PackageWeights


@dataclass(frozen=True)
class _Merge:
    """One initializer: a parameter's base in `layout`, plus LoRA `terms` [(update, adapter weight)]."""

    parameter: str
    layout: str
    terms: tuple[tuple[LoraUpdate, float], ...]


@dataclass(frozen=True)
class _Rows:
    """One token-embedding initializer grown by textual-inversion rows [n, hidden]."""

    layout: str
    vectors: np.ndarray


class Overrides(Mapping[str, np.ndarray]):
    """{initializer name: new value} of one component; each read computes the value afresh (a new array)."""

    def __init__(self, weights: PackageWeights, component: str, plan: Mapping[str, _Merge | _Rows]) -> None:
        self.weights = weights
        self.component = component
        self._plan = dict(plan)

    @classmethod
    def plan(cls, weights: PackageWeights, component: str, terms: Mapping[str, Sequence[tuple[LoraUpdate, float]]],
             token_vectors: Sequence[np.ndarray]) -> "Overrides":
        """The overrides of `component`: LoRA `terms` per parameter, and textual-inversion `token_vectors`."""
        from diffrt.runtime.adapters.textual_inversion import TOKEN_EMBEDDING

        placements = weights.placements(component) if terms or token_vectors else {}
        plan: dict[str, _Merge | _Rows] = {}
        for parameter, parameter_terms in terms.items():
            # a partial graph (DeepCache's shallow UNet) holds only some of its source's parameters
            for place in placements.get(parameter, ()):
                plan[place.initializer] = _Merge(parameter, place.layout, tuple(parameter_terms))
        if token_vectors:
            vectors = np.stack(list(token_vectors))
            for place in placements[TOKEN_EMBEDDING]:
                plan[place.initializer] = _Rows(place.layout, vectors)
        return cls(weights, component, plan)

    def __getitem__(self, name: str) -> np.ndarray:
        step = self._plan[name]
        base = self.weights.base(self.component, name)
        if isinstance(step, _Merge):
            return merged_weight(base, step.layout, step.terms, f"{self.component} {step.parameter}")
        table = base.reshape(base.shape[0], -1) if step.layout == "direct" else base.T
        grown = np.concatenate([table, step.vectors.astype(table.dtype)], axis=0)
        return np.ascontiguousarray(grown if step.layout == "direct" else grown.T)

    def __contains__(self, name: object) -> bool:  # Mapping's default would compute the value
        return name in self._plan

    def __iter__(self) -> Iterator[str]:
        return iter(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def __repr__(self) -> str:
        return f"Overrides({self.component!r}, {len(self)} initializers)"
