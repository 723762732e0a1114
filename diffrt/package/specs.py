"""The inputs and outputs a package declares for each component: names, dtypes, shapes with named dynamic
dimensions, and the inclusive range of each named dimension (the manifest's `inputs`, `outputs` and `dims`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from diffrt.errors import InputError

Dim = int | str | None
DimRanges = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: fixed dims are ints, dynamic dims a name (shared across inputs) or None."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))

    @classmethod
    def from_manifest(cls, entry: Mapping[str, object]) -> "TensorSpec":
        """From a `diffrt.json` entry: {"name": ..., "dtype": "float32", "shape": ["batch", 4, "height", ...]}."""
        return cls(str(entry["name"]), np.dtype(str(entry["dtype"])), tuple(entry["shape"]))  # type: ignore[arg-type]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.dtype} [{dims}]"


def parse_dim_ranges(dims: Mapping[str, Sequence[int]] | None) -> dict[str, tuple[int, int]]:
    """The manifest's `dims` ({"batch": [1, 16]}) as inclusive (low, high) tuples, validated."""
    ranges: dict[str, tuple[int, int]] = {}
    for name, bounds in (dims or {}).items():
        if len(bounds) != 2 or not all(isinstance(b, int) for b in bounds) or bounds[0] > bounds[1]:
            raise InputError(f"`dim_ranges[{name!r}]` must be [low, high] integers with low <= high; got {bounds!r}")
        ranges[str(name)] = (int(bounds[0]), int(bounds[1]))
    return ranges
