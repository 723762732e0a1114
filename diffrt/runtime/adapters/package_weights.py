"""A package's adaptable weights: each component's parameter map and the base initializers it names (memory-mapped
read-only from the package files, so reading a base weight costs no copy until a delta is added to it)."""
from __future__ import annotations

import threading

import numpy as np

from diffrt.package.reader import ModelPackage
from diffrt.package.weights import Placement, parameter_placements, read_initializers

#: the components adapters apply to (LoRA: UNet and text encoders; textual inversion: the text encoders)
ADAPTABLE = ("unet", "text_encoder", "text_encoder_2")


class PackageWeights:
    def __init__(self, package: ModelPackage) -> None:
        self.package = package
        self._placements: dict[str, dict[str, list[Placement]]] = {}
        self._base: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def components(self) -> list[str]:
        return [name for name in ADAPTABLE if self.package.has(name)]

    def placements(self, component: str) -> dict[str, list[Placement]]:
        """{parameter: placements}; PackageError saying to re-export a package exported without the map."""
        if component not in self._placements:
            info = self.package.component(component)
            self._placements[component] = parameter_placements(component, info.manifest, self.package.root)
        return self._placements[component]

    def parameter_names(self) -> dict[str, set[str]]:
        return {component: set(self.placements(component)) for component in self.components()}

    def base(self, component: str, initializer: str) -> np.ndarray:
        """The initializer as exported (read-only)."""
        with self._lock:
            arrays = self._base.setdefault(component, {})
            if initializer not in arrays:
                wanted = {p.initializer for places in self.placements(component).values() for p in places}
                arrays.update(read_initializers(self.package.component(component).path, wanted))
            return arrays[initializer]
