"""int8 for the OpenVINO engine (issue #19): NNCF quantizes the read `ov.Model`, the result is cached as OpenVINO IR.

Two recipes, the ones optimum-intel applies to Stable Diffusion:
- **hybrid** (with calibration feeds, what a pipeline's UNet gets): Convolutions and the activation-by-activation
  MatMuls of attention run in int8 (weights and activations, ranges measured on the calibration feeds), while the
  MatMuls with weights (the linear layers) keep float activations. Its speed and image quality on the sd15 preset are
  in docs/benchmarks.md. (While it was chosen, compressing the linear layers' weights to int8 as well looked slower,
  since OpenVINO decompresses them every call, and quantizing their activations too cost quality; those two runs
  were not recorded.)
- **weights** (without calibration feeds): every weight int8 (`nncf.compress_weights`, INT8_ASYM), activations float.
  It saves memory, not time: the kernels decompress the weights to the float precision.
Whatever is not int8 runs in bf16 where the CPU has it (AMX / AVX-512 BF16), else in f32.

int8 kernels are faster than float ones only on CPUs with int8 dot-product instructions (VNNI or AMX); elsewhere
OpenVINO emulates them, so int8 is refused there with the flags that are missing. NNCF (`pip install 'diffrt[int8]'`)
is imported only when a model is quantized, never for a cached one.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from diffrt.errors import ConfigError
from diffrt.package.files import AtomicFolder, cache_root, files_fingerprint, write_json

logger = logging.getLogger(__name__)

#: int8 dot-product instructions: AMX (Sapphire Rapids+), AVX-512 VNNI (Cascade Lake+), AVX-VNNI (Alder Lake+)
INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
#: changes when the recipe below changes, so a cached model of an older recipe is never reused
RECIPE_VERSION = 1
Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Calibration:
    """Calibration feeds for hybrid int8: `feeds()` makes them (called only when no cached model fits) and `key`
    names what they depend on (prompts, steps, size, seed), so a cached model is reused only for the same feeds."""

    key: str
    feeds: Callable[[], Sequence[Feeds]]


def int8_support(flags: frozenset[str], capabilities: Sequence[str]) -> tuple[bool, str]:
    """(whether int8 runs natively on this CPU, a description of what was found) from its flags and OpenVINO's
    CPU capabilities."""
    native = [flag for flag in INT8_CPU_FLAGS if flag in flags]
    # Without /proc/cpuinfo (not Linux) OpenVINO's own report is all there is.
    supported = "INT8" in capabilities and (bool(native) or not flags)
    flags_found = native or "without " + " / ".join(INT8_CPU_FLAGS)
    found = f"OpenVINO CPU capabilities {list(capabilities)}, CPU flags {flags_found}"
    return supported, found


def require_int8(flags: frozenset[str], capabilities: Sequence[str]) -> None:
    """A `ConfigError` naming the missing instructions where this CPU has no int8 dot products."""
    supported, found = int8_support(flags, capabilities)
    if not supported:
        raise ConfigError(
            "`inference_precision` 'int8' needs a CPU with int8 dot-product instructions "
            f"({', '.join(INT8_CPU_FLAGS)}: AMX or VNNI); this one has none of them ({found}), so int8 would be "
            "emulated and slower than float; use 'bf16', 'fp32' or 'auto'"
        )


@contextlib.contextmanager
def torch_hidden() -> Iterator[None]:
    """`import torch` fails inside the block unless torch is loaded already.

    NNCF registers a torch tensor backend on import and probes for torch models on every call wherever torch can be
    imported, which would load torch (seconds, hundreds of MB) into a runtime that never needs it; both attempts
    swallow the ImportError. The block is process-wide: nothing else in a diffrt runtime imports torch meanwhile."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        yield
    finally:
        if hide and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def import_nncf() -> Any:
    """The `nncf` module, or a `ConfigError` naming the option that needs it."""
    try:
        with torch_hidden():
            import nncf
    except ImportError as error:
        raise ConfigError(
            "`inference_precision` 'int8' needs the nncf package to quantize the model, which is not installed here; "
            "install it with `pip install 'diffrt[int8]'`, or use 'bf16', 'fp32' or 'auto'"
        ) from error
    # NNCF logs every operation it leaves float at INFO (hundreds of lines for a UNet); its warnings still show
    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf


def weighted_matmuls(model: Any) -> list[str]:
    """The MatMuls of `model` with a constant (weight) input: the linear layers, which hybrid int8 leaves float."""
    names = []
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        for port in range(2):
            source = op.input_value(port).get_node()
            while source.get_type_name() in ("Convert", "Transpose", "Reshape"):
                source = source.input_value(0).get_node()
            if source.get_type_name() == "Constant":
                names.append(op.get_friendly_name())
                break
    return names


def quantize(model: Any, feeds: Sequence[Feeds] | None) -> Any:
    """`model` quantized by NNCF: hybrid int8 with calibration `feeds`, weight-only int8 without (module docstring)."""
    nncf = import_nncf()
    with torch_hidden():
        return _quantize(nncf, model, feeds)


def _quantize(nncf: Any, model: Any, feeds: Sequence[Feeds] | None) -> Any:
    if not feeds:
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    from nncf.parameters import ModelType
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters

    return nncf.quantize(
        model,
        nncf.Dataset(list(feeds)),
        model_type=ModelType.TRANSFORMER,  # attention's MatMuls and Softmax get transformer-aware placement
        subset_size=len(feeds),
        ignored_scope=nncf.IgnoredScope(names=weighted_matmuls(model), validate=False),
        # SmoothQuant moves activation outliers into weights of the linear layers, which stay float here
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)),
    )


def model_files(path: Path) -> list[Path]:
    """The ONNX file and its external data files (every other file of its folder that the model may read)."""
    data = sorted(p for p in path.parent.glob(f"{path.name}_data*") if p.is_file())
    return [path, *data]


def cache_key(path: Path, calibration: Calibration | None) -> str:
    """What a quantized model depends on: the model files (path, size, mtime), the calibration, the recipe, and the
    NNCF and OpenVINO versions."""
    return files_fingerprint(model_files(path), calibration.key if calibration is not None else None,
                             RECIPE_VERSION, _version("nncf"), _version("openvino"), length=20)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_cache_dir() -> Path:
    """Where quantized models are kept when the engine has no `optimized_model_cache`: `$DIFFRT_CACHE/openvino-int8`."""
    return cache_root() / "openvino-int8"


def cached_model(core: Any, path: Path, calibration: Calibration | None, cache_dir: Path) -> Any | None:
    """The int8 model of `path` made before with this calibration, read from `cache_dir`; None when there is none.
    Read before the float model, which a cached start then never reads."""
    folder = _folder(path, calibration, cache_dir)
    if not (folder / "model.xml").is_file():
        return None
    logger.info("int8 model of %s from the cache %s", path, folder)
    return core.read_model(str(folder / "model.xml"))


def _folder(path: Path, calibration: Calibration | None, cache_dir: Path) -> Path:
    return cache_dir / f"{path.parent.name}-{cache_key(path, calibration)}"


def quantized_model(core: Any, model: Any, path: Path, calibration: Calibration | None, cache_dir: Path,
                    adapt: Callable[[Feeds], Feeds]) -> Any:
    """The int8 model of `model` (read from `path`): from `cache_dir` when this exact one was made before, else
    quantized now (minutes for a real UNet: the calibration feeds, then NNCF's statistics), saved there and read
    back, so its weights are mapped from the saved file rather than held on the heap (the quantizing process would
    otherwise peak at the float and int8 models at once: 9.2 GiB for sd15's UNet, against 2.7 GiB from the cache)."""
    cached = cached_model(core, path, calibration, cache_dir)
    if cached is not None:
        return cached
    folder = _folder(path, calibration, cache_dir)
    import_nncf()  # before the calibration feeds, which may take minutes
    start = time.perf_counter()
    feeds = [adapt(f) for f in calibration.feeds()] if calibration is not None else None
    calibrated = time.perf_counter()
    quantized = quantize(model, feeds)
    logger.info("quantized %s to int8 (%s, %.1f s calibration feeds, %.1f s NNCF)", path,
                "hybrid" if feeds else "weights only", calibrated - start, time.perf_counter() - calibrated)
    ov = sys.modules["openvino"]
    with AtomicFolder(folder) as temp:
        ov.save_model(quantized, str(temp / "model.xml"), compress_to_fp16=False)
        write_json(temp / "source.json", {"model": str(path), "calibration": calibration.key if calibration else None,
                                          "recipe": RECIPE_VERSION, "nncf": _version("nncf")})
    del quantized, model
    return core.read_model(str(folder / "model.xml"))
