"""A package's adaptable weights: each component's parameter map and the base initializers it names (memory-mapped
read-only from the package files, so reading a base weight costs no copy until a delta is added to it)."""
from __future__ import annotations

import threading

import numpy as np

from diffrt.errors import ConfigError
from diffrt.package.names import UNET_SHALLOW
from diffrt.package.reader import ModelPackage
from diffrt.package.weights import Placement, parameter_placements, read_initializers

#: the components adapters apply to (LoRA: UNet and text encoders; textual inversion: the text encoders)
ADAPTABLE = ("unet", UNET_SHALLOW, "text_encoder", "text_encoder_2")
#: components holding part of another's parameters (DeepCache's shallow UNet): that one's adapters apply to them
PARAMETERS_OF = {UNET_SHALLOW: "unet"}


def parameter_source(component: str) -> str:
    """The component whose adapter updates (and per-component adapter weights) apply to `component`."""
    return PARAMETERS_OF.get(component, component)


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
            if (info.manifest or {}).get("precision") == "bf16":
                # NumPy has no bfloat16: its weights are read as their bits, which a float delta cannot be added to
                raise ConfigError(
                    f"adapters (LoRA, textual inversion) need fp32 or fp16 weights; the {component} of "
                    f"{self.package.root} is bf16: re-export it with --precision fp16 or fp32")
            self._placements[component] = parameter_placements(component, info.manifest, self.package.root)
        return self._placements[component]

    def parameter_names(self) -> dict[str, set[str]]:
        """The parameters an adapter file may name, per component it may address."""
        return {component: set(self.placements(component)) for component in self.components()
                if component not in PARAMETERS_OF}

    def base(self, component: str, initializer: str) -> np.ndarray:
        """The initializer as exported (read-only)."""
        with self._lock:
            arrays = self._base.setdefault(component, {})
            if initializer not in arrays:
                wanted = {p.initializer for places in self.placements(component).values() for p in places}
                arrays.update(read_initializers(self.package.component(component).path, wanted))
            return arrays[initializer]
