"""Inference engines behind one protocol; `create_engine` builds one for a package component.

`onnxruntime`, `openvino` and `tensorrt` are imported only when such an engine is built or its provider checked, so
code that needs only the protocol never loads them. Provider "trt" is native TensorRT (prebuilt plans, see
docs/tensorrt.md); "tensorrt" stays ONNX Runtime's TensorRT execution provider.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from diffrt.errors import ConfigError
from diffrt.package.names import UNET_SHALLOW
from diffrt.runtime.engines.base import (
    Engine,
    TensorSpec,
    adapt_feeds,
    lossless_cast,
    parse_dim_ranges,
    validate_feeds,
)

if TYPE_CHECKING:
    from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from diffrt.runtime.engines.openvino import OpenVINOEngine
    from diffrt.runtime.engines.tensorrt import TensorRTEngine

logger = logging.getLogger(__name__)

# A package's components whose engines take `cuda_graph`: CUDA graphs pay off for a model run at every denoising
# step; the text encoders and the VAE run once per image, and some of their graphs cannot be captured at all (a
# kernel ONNX Runtime keeps on the CPU, such as the text encoder's integer ArgMax). DeepCache's shallow UNet runs at
# the steps between full UNet runs.
GRAPHED_COMPONENTS = ("unet", UNET_SHALLOW)
#: providers whose engine takes an inference precision, also written as a suffix (`openvino:bf16`, `openvino:int8`)
PRECISION_PROVIDERS = ("openvino", "auto")
#: ONNX Runtime CPU engine options under which a session reads every weight of its file as stored, so all sessions of
#: the file share one copy (`share_weights`): nothing pre-packed, no NCHWc-reordered convolutions. A trade: slower
#: UNet steps for a fraction of the memory per added pipeline (docs/benchmarks.md, "Sharing weights between sessions")
SHARED_WEIGHT_OPTIONS: dict[str, Any] = {"prepack_weights": False, "disabled_optimizers": ["NchwcTransformer"],
                                         "trim_mapped_weights": False}

__all__ = [
    "Engine",
    "OnnxRuntimeEngine",
    "OpenVINOEngine",
    "PRECISION_PROVIDERS",
    "SHARED_WEIGHT_OPTIONS",
    "TensorRTEngine",
    "TensorSpec",
    "auto_provider",
    "adapt_feeds",
    "check_provider",
    "create_engine",
    "lossless_cast",
    "is_onnxruntime_cpu",
    "parse_dim_ranges",
    "shared_weight_options",
    "split_engine_options",
    "split_precision",
    "validate_feeds",
]


def create_engine(component: Any, provider: Any = "cpu", **options: Any) -> Engine:
    """An engine for `component`: a `ComponentInfo` (its manifest's dimension ranges apply) or a model path.

    `provider` "openvino" builds an `OpenVINOEngine` (options: inference_precision, threads, optimized_model_cache,
    static_shapes, ...); "trt" a `TensorRTEngine` from the component's prebuilt plans (options: device_id,
    cuda_graph, max_contexts; threads is accepted and ignored); "auto" the fastest engine installed here
    (`auto_provider`); anything else an `OnnxRuntimeEngine` (options: threads, graph_optimization_level,
    optimized_model_cache, disabled_optimizers, share_weights, prepack_weights, and on CUDA device_id, cuda_graph,
    prefer_nhwc, ...). `cuda_graph`
    applies to the components in `GRAPHED_COMPONENTS` only.
    """
    if _named(provider, "auto"):
        provider = auto_provider()
        options = _auto_options(provider, options)
    if not isinstance(component, (str, Path)) and component.name not in GRAPHED_COMPONENTS:
        options.pop("cuda_graph", None)
    path = component if isinstance(component, (str, Path)) else component.path
    engine_class: type[Any]
    fixed: dict[str, Any]
    if _named(provider, "openvino"):
        from diffrt.runtime.engines.openvino import OpenVINOEngine

        if not isinstance(component, (str, Path)):
            options.setdefault("input_specs", component.inputs)
            options.setdefault("output_specs", component.outputs)
        engine_class, fixed = OpenVINOEngine, {}
    elif _named(provider, "trt"):
        from diffrt.runtime.engines.tensorrt import TensorRTEngine

        if not isinstance(component, (str, Path)):
            options.setdefault("input_specs", component.inputs)
            options.setdefault("output_specs", component.outputs)
        engine_class, fixed = TensorRTEngine, {}
    else:
        from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

        engine_class, fixed = OnnxRuntimeEngine, {"provider": provider}
    if not isinstance(component, (str, Path)):
        options.setdefault("dim_ranges", getattr(component, "dim_ranges", None))
    _check_options(engine_class, provider, options)
    return engine_class(path, **fixed, **options)


def split_precision(spec: str) -> tuple[str, dict[str, str]]:
    """`openvino:int8` -> ("openvino", {"inference_precision": "int8"}); a spec without a suffix -> (spec, {}).
    The precision itself is checked by the engine (`inference_precision`)."""
    provider, sep, precision = spec.partition(":")
    if not sep:
        return spec, {}
    if provider.lower() not in PRECISION_PROVIDERS or not precision:
        raise ConfigError(f"`provider` takes a precision suffix only on {' and '.join(PRECISION_PROVIDERS)} "
                          f"(openvino:fp32|bf16|int8|auto); got {spec!r}")
    return provider, {"inference_precision": precision}


def split_engine_options(
        given: Iterable[tuple[str | None, str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(component or None, key, value) triples (`--engine-option [COMPONENT:]KEY=VALUE`) -> (options of every
    engine, {component: its own options}), the pipeline's `**engine_options` and `component_options`."""
    common: dict[str, Any] = {}
    per_component: dict[str, dict[str, Any]] = {}
    for component, key, value in given:
        (per_component.setdefault(component, {}) if component else common)[key] = value
    return common, per_component


def auto_provider() -> str:
    """`provider="auto"`: ONNX Runtime CUDA where it and a GPU are here (issue #17), else OpenVINO where installed
    (faster than ONNX Runtime on CPUs, issue #8), else ONNX Runtime CPU."""
    from diffrt.runtime.engines.openvino import openvino_available

    if importlib.util.find_spec("onnxruntime") is not None and _cuda_usable():
        choice = "cuda"
    elif openvino_available():
        choice = "openvino"
    elif importlib.util.find_spec("onnxruntime") is not None:
        choice = "cpu"
    else:
        raise ConfigError(
            "`provider` 'auto' found no engine: install `diffrt[openvino]` or `diffrt[cpu]` (ONNX Runtime)"
        )
    names = {"cuda": "ONNX Runtime CUDA", "openvino": "OpenVINO", "cpu": "ONNX Runtime CPU"}
    logger.info("provider 'auto' chose %s", names[choice])
    return choice


def _cuda_usable() -> bool:
    from diffrt.runtime.engines.onnxruntime_cuda import cuda_usable

    return cuda_usable()


def _auto_options(provider: str, options: dict[str, Any]) -> dict[str, Any]:
    """CUDA: CUDA graphs where the model allows them (measured fastest on an H200, docs/benchmarks.md).
    OpenVINO: bf16 where the CPU has it, and per-shape compiled models (faster than dynamic shapes; a pipeline's
    sizes are fixed per call). ONNX Runtime's CPU provider is fp32, so inference_precision fp32 / auto are no-ops."""
    options = dict(options)
    if provider == "cuda":
        options.setdefault("cuda_graph", "auto")
        if options.get("inference_precision") in ("fp32", "auto"):
            del options["inference_precision"]
    elif provider == "openvino":
        options.setdefault("inference_precision", "auto")
        options.setdefault("static_shapes", True)
    elif options.get("inference_precision") in ("fp32", "auto"):
        del options["inference_precision"]
    return options


def _named(provider: Any, name: str) -> bool:
    return isinstance(provider, str) and provider.lower() == name


def _check_options(engine_class: type, provider: Any, options: dict[str, Any]) -> None:
    """An option the chosen engine does not take is a `ConfigError` naming it, not a TypeError from deep inside."""
    parameters = inspect.signature(engine_class).parameters.values()
    accepted = [p.name for p in parameters if p.name not in ("path", "provider") and p.kind != p.VAR_KEYWORD]
    accepted += list(getattr(engine_class, "keyword_options", ()))  # options taken through **kwargs
    unknown = [name for name in options if name not in accepted]
    if unknown:
        raise ConfigError(
            f"`{unknown[0]}` is not an option of provider {provider!r} ({engine_class.__name__}); "
            f"its options are: {', '.join(accepted)}"
        )


def check_initializer_overrides(provider: Any, package: Any, components: Sequence[str]) -> None:
    """LoRA and textual inversion replace initializers when an engine is created: ONNX Runtime's
    `SessionOptions.add_initializer`, OpenVINO's constants swapped in the read model, TensorRT's refit (LoRA only).
    For provider "trt": ConfigError, before any engine loads, when the plans of `components` (those adapters may
    change) were built without `--refit`."""
    resolved = auto_provider() if _named(provider, "auto") else provider
    if _named(resolved, "trt"):
        from diffrt.runtime.engines.tensorrt_refit import check_package_refittable

        check_package_refittable(package, components)


def is_onnxruntime_cpu(provider: Any) -> bool:
    """Whether `provider` ("auto" resolved) runs ONNX Runtime's CPU execution provider alone."""
    resolved = auto_provider() if _named(provider, "auto") else provider
    return _named(resolved, "cpu") or resolved == "CPUExecutionProvider"


def shared_weight_options(provider: Any, parameter: str = "shared_weights") -> dict[str, Any]:
    """A copy of `SHARED_WEIGHT_OPTIONS` for `provider`; ConfigError naming `parameter` when the provider is not ONNX
    Runtime's CPU one (other engines keep their weights in their own form, in device memory or compiled)."""
    if not is_onnxruntime_cpu(provider):
        resolved = auto_provider() if _named(provider, "auto") else provider
        raise ConfigError(f"`{parameter}` applies to provider 'cpu' (ONNX Runtime's CPU sessions), whose sessions "
                          f"can read one shared copy of the weights; got provider {resolved!r}")
    return {name: list(value) if isinstance(value, list) else value for name, value in SHARED_WEIGHT_OPTIONS.items()}


def check_provider(provider: Any) -> None:
    """Raise a `DiffrtError` naming `provider` when it cannot run here (before any engine is built)."""
    if _named(provider, "auto"):
        auto_provider()
    elif _named(provider, "openvino"):
        from diffrt.runtime.engines.openvino import import_openvino

        import_openvino()
    elif _named(provider, "trt"):
        from diffrt.runtime.engines.tensorrt import check_trt_provider

        check_trt_provider()
    else:
        from diffrt.runtime.engines.onnxruntime import check_provider as _check

        _check(provider)


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeEngine":
        from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    if name == "OpenVINOEngine":
        from diffrt.runtime.engines.openvino import OpenVINOEngine

        return OpenVINOEngine
    if name == "TensorRTEngine":
        from diffrt.runtime.engines.tensorrt import TensorRTEngine

        return TensorRTEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
