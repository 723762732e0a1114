"""LoRA on provider "trt": TensorRT refit of a deserialized plan.

A plan built refittable (`diffrt build-engines PACKAGE --refit`) keeps its weights replaceable by name, and for a
network read by TensorRT's ONNX parser the names are the ONNX initializers' (what the package's parameter map and
the adapter overrides name). The pipeline creates a new engine whenever a component's overrides change (as it
re-creates ONNX Runtime sessions), so each refit starts from the plan as built: the overrides are set by name, the
weights TensorRT needs beside them (an initializer it fused with another into one kernel's weights) are read from
the component's ONNX file, and the engine is refitted before its first execution context exists. Textual inversion
is refused on "trt" (`TextualInversionMixin`): it grows the token embedding, and a refit keeps every weight's shape.

Written to TensorRT 10's Python API; not run on a GPU yet (no TensorRT wheel installs on the machines this project
is tested on): `tests/test_tensorrt_gpu.py` runs it where TensorRT and a GPU are present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from diffrt.errors import ConfigError, EngineError, listing
from diffrt.package.names import ENGINES_FOLDER
from diffrt.package.reader import ModelPackage
from diffrt.package.tensorrt_records import EngineRecord, read_records, rebuild_command


def not_refittable(records: Sequence[EngineRecord]) -> list[EngineRecord]:
    """The records of plans built without `--refit` (TensorRT cannot change their weights)."""
    return [record for record in records if not record.flags.get("refit")]


def check_package_refittable(package: ModelPackage, components: Sequence[str]) -> None:
    """ConfigError, before any engine is loaded, when one of `components` (those adapters may change) has TensorRT
    plans built without `--refit`, naming the components and the command that rebuilds them."""
    fixed = []
    for name in components:
        folder = package.component(name).path.parent / ENGINES_FOLDER
        records = read_records(folder) if folder.is_dir() else []
        if not_refittable(records):
            fixed.append(name)
    if fixed:
        raise ConfigError(
            f"LoRA on provider 'trt' refits the TensorRT engines, and the engines of "
            f"{', '.join(fixed)} in {package.root} were built without --refit: rebuild them with "
            f"`{rebuild_command(package.root)} --refit`, or use provider 'cuda' (ONNX Runtime)")


#: rounds of "set what TensorRT reports missing" before giving up (a weight it fused with others pulls those in)
MAX_MISSING_ROUNDS = 4


def plain_dtype(array: np.ndarray) -> np.ndarray:
    """`array`, C-contiguous, as a view with NumPy's own dtype object for its type. TensorRT's NumPy conversion
    (`trt.Weights(array)`) matches the dtype by object identity, so it refuses an equal but distinct '<f4' or '<f2',
    which is what package weights memory-mapped by `diffrt.package.weights` carry."""
    return np.ascontiguousarray(array).view(np.dtype(array.dtype.name))


def refit_engine(engine: Any, overrides: Mapping[str, np.ndarray], model: Path, plan: Path, trt: Any,
                 trt_logger: Any, recent_errors: Callable[[], str]) -> None:
    """Replace the weights named in `overrides` (ONNX initializer names) in the deserialized `engine`, plus those
    TensorRT needs with them, read from `model`; EngineError naming the weight TensorRT cannot refit. `trt`,
    `trt_logger` and `recent_errors` are `diffrt.runtime.engines.tensorrt`'s (passed in: that module imports this
    one)."""
    from diffrt.package.weights import locate_initializers, read_initializers

    if not engine.refittable:
        raise ConfigError(f"{plan} was built without --refit, so adapters cannot change its weights: "
                          f"{rebuild_command(model.parent.parent)} --refit")
    refitter = trt.Refitter(engine, trt_logger)
    known = set(refitter.get_all_weights())
    unknown = sorted(name for name in overrides if name not in known)
    if unknown:
        raise EngineError(f"{plan}: TensorRT cannot refit {listing(unknown, 3)}: the plan does not hold them as "
                          "named weights (built from another ONNX file, or rewritten by the ONNX parser); use provider "
                          "'cuda' (ONNX Runtime) for this adapter")
    alive: list[Any] = []  # trt.Weights point into these arrays until the refit is done

    def put(name: str, array: np.ndarray) -> None:
        kept = plain_dtype(array)
        try:
            weights = trt.Weights(kept)
        except (TypeError, ValueError) as error:
            raise EngineError(f"{plan}: TensorRT cannot take the weights of {name} (dtype {array.dtype}): "
                              f"{error}") from error
        alive.extend((weights, kept))
        if not refitter.set_named_weights(name, weights):
            raise EngineError(f"{plan}: TensorRT refused the new weights of {name} (dtype {array.dtype}, shape "
                              f"{array.shape}): {recent_errors()}")

    for name, array in overrides.items():
        put(name, array)
    stored: set[str] | None = None  # the model's initializers, read once something is missing
    for attempt in range(MAX_MISSING_ROUNDS + 1):
        missing = [name for name in refitter.get_missing_weights() if name]  # unnamed weights come back as None
        if not missing:
            break
        if attempt == MAX_MISSING_ROUNDS:
            raise EngineError(f"{plan}: TensorRT still misses weights after {MAX_MISSING_ROUNDS} rounds: "
                              f"{listing(sorted(missing), 3)}")
        stored = stored if stored is not None else set(locate_initializers(model, None, skip_typed=True))
        elsewhere = [name for name in missing if name not in stored]
        if elsewhere:  # a Constant node's output, or a weight the parser made up (BatchNormalization's scale)
            raise EngineError(f"{plan}: refitting {listing(sorted(overrides), 3)} needs weights that are not "
                              f"initializers of {model}: {listing(sorted(elsewhere), 3)}; use provider 'cuda' "
                              "(ONNX Runtime) for this adapter")
        for name, array in read_initializers(model, missing).items():
            put(name, array)
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT could not refit {plan}: {recent_errors()}")
