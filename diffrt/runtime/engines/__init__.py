"""Inference engines behind one protocol; `create_engine` builds one for a package component.

`onnxruntime` is imported only when an ONNX Runtime engine is built or a provider checked, so code that needs only
the protocol (a TensorRT deployment) never loads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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

__all__ = [
    "Engine",
    "OnnxRuntimeEngine",
    "TensorSpec",
    "adapt_feeds",
    "check_provider",
    "create_engine",
    "lossless_cast",
    "parse_dim_ranges",
    "validate_feeds",
]


def create_engine(component: Any, provider: Any = "cpu", **options: Any) -> Engine:
    """An engine for `component`: a `ComponentInfo` (its manifest's dimension ranges apply) or a model path.

    `options` go to `OnnxRuntimeEngine` (threads, graph_optimization_level, optimized_model_cache, ...).
    """
    from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

    if isinstance(component, (str, Path)):
        return OnnxRuntimeEngine(component, provider=provider, **options)
    options.setdefault("dim_ranges", getattr(component, "dim_ranges", None))
    return OnnxRuntimeEngine(component.path, provider=provider, **options)


def check_provider(provider: Any) -> None:
    """Raise `EngineError` naming `provider` when it cannot run here (before any engine is built)."""
    from diffrt.runtime.engines.onnxruntime import check_provider as _check

    _check(provider)


def __getattr__(name: str) -> Any:
    if name == "OnnxRuntimeEngine":
        from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
