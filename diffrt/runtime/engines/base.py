"""The Engine protocol and the input checks every engine runs before it touches an accelerator.

An engine is one compiled model (an ONNX Runtime session, a TensorRT engine). It records its inputs and outputs as
`TensorSpec`s; `adapt_feeds` converts a feed's dtype only when the conversion is lossless, and `validate_feeds`
checks names, dtypes, ranks, fixed sizes, named dynamic sizes (equal across inputs) and the manifest's ranges,
raising `InputError` that names the input, what was expected and what was got (Apple ml-stable-diffusion's habit).
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from diffrt.errors import InputError
from diffrt.package.specs import Dim, DimRanges, TensorSpec, parse_dim_ranges

__all__ = ["Dim", "DimRanges", "Engine", "TensorSpec", "adapt_feeds", "lossless_cast", "parse_dim_ranges",
           "validate_feeds"]


@runtime_checkable
class Engine(Protocol):
    """What pipelines need from a compiled model; `run` validates its feeds before running."""

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        """Run on `feeds`. `release_memory`: hand the run's working memory (intermediate tensors) back once it is
        done instead of keeping it for the next run — for the last run of a stage (the last denoising step, a VAE
        decode), so that a pipeline's resident memory is its weights plus one stage's working memory."""
        ...

    def close(self) -> None: ...


def _as_array(name: str, value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.generic):
        return np.asarray(value)
    raise InputError(f"`{name}` must be a numpy.ndarray; got {type(value).__name__}")


def _check_names(specs: Sequence[TensorSpec], feeds: Mapping[str, object]) -> None:
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in feeds]
    if missing:
        raise InputError(
            f"`{missing[0]}` is a required input of this engine (inputs: {', '.join(expected)}); "
            f"got feeds for: {', '.join(feeds) or 'nothing'}"
        )
    extra = [name for name in feeds if name not in expected]
    if extra:
        raise InputError(f"`{extra[0]}` is not an input of this engine; expected only: {', '.join(expected)}")


def lossless_cast(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as `dtype` when every value survives the round trip (int32 -> int64, 999.0 -> int64 999, ...).

    Optimum packages take an int64 (or float16) `timestep` where our pipelines hold float32; a conversion that would
    change a value (999.5 -> 999) is refused rather than silently truncated.
    """
    if array.dtype == dtype:
        return array
    numeric = "biuf"
    if array.dtype.kind not in numeric or dtype.kind not in numeric:
        raise InputError(f"`{name}` must have dtype {dtype}; got {array.dtype}")
    if array.dtype.kind == "f" and dtype.kind in "biu" and not np.all(np.isfinite(array)):
        raise InputError(f"`{name}` must have dtype {dtype}; got {array.dtype} with non-finite values")
    with np.errstate(all="ignore"):
        converted = array.astype(dtype)
        back = converted.astype(array.dtype)
    if not np.array_equal(back, array, equal_nan=array.dtype.kind == "f"):
        raise InputError(
            f"`{name}` must have dtype {dtype}; got {array.dtype} whose values do not convert exactly "
            f"(cast it explicitly if the rounding is intended)"
        )
    return converted


def adapt_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Feeds as numpy arrays in each input's dtype, converted only where lossless; unknown names pass through."""
    dtypes = {spec.name: spec.dtype for spec in specs}
    adapted: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        array = _as_array(name, value)
        adapted[name] = lossless_cast(name, array, dtypes[name]) if name in dtypes else array
    return adapted


def _check_dims(spec: TensorSpec, array: np.ndarray, bound: dict[str, tuple[int, str]], ranges: DimRanges) -> None:
    expected_shape = f"shape [{', '.join('?' if d is None else str(d) for d in spec.shape)}]"
    if array.ndim != len(spec.shape):
        raise InputError(f"`{spec.name}` must have rank {len(spec.shape)} ({expected_shape}); got shape {array.shape}")
    for axis, (dim, size) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(dim, int):
            if size != dim:
                raise InputError(
                    f"`{spec.name}` dimension {axis} must be {dim} ({expected_shape}); got shape {array.shape}"
                )
            continue
        if dim is None:
            continue
        if dim in bound and bound[dim][0] != size:
            value, source = bound[dim]
            raise InputError(
                f"`{spec.name}` dimension {axis} ({dim!r}) must equal {value} as in `{source}`; "
                f"got {size} (shape {array.shape})"
            )
        bound.setdefault(dim, (size, spec.name))
        if dim in ranges:
            low, high = ranges[dim]
            if not low <= size <= high:
                raise InputError(
                    f"`{spec.name}` dimension {axis} ({dim!r}) must be in [{low}, {high}]; got {size} "
                    f"(shape {array.shape})"
                )


def validate_feeds(
    specs: Sequence[TensorSpec],
    feeds: Mapping[str, object],
    dim_ranges: DimRanges | None = None,
) -> dict[str, int]:
    """Check feeds against the specs; returns the size bound to each named dynamic dimension.

    Raises `InputError` for a missing or unknown name, a wrong dtype or rank, a fixed dimension of another size,
    a named dimension whose size differs between inputs, or a size outside `dim_ranges` (inclusive).
    """
    _check_names(specs, feeds)
    ranges = dict(dim_ranges or {})
    bound: dict[str, tuple[int, str]] = {}
    for spec in specs:
        array = _as_array(spec.name, feeds[spec.name])
        if array.dtype != spec.dtype:
            raise InputError(f"`{spec.name}` must have dtype {spec.dtype}; got {array.dtype}")
        _check_dims(spec, array, bound, ranges)
    return {dim: size for dim, (size, _) in bound.items()}
