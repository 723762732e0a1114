"""Which provider a pipeline runs on: checked before any engine is built, with errors that name it."""
from __future__ import annotations

from typing import Any

from diffrt.errors import InputError
from diffrt.package.reader import ModelPackage


def provider_name(provider: Any) -> str:
    """The first provider's name, lower case ("cpu", "cuda", "openvino", "auto", ...)."""
    first = provider if isinstance(provider, str) else next(iter(provider), "")
    name = first if isinstance(first, str) else first[0]
    return str(name).lower()


def split_provider_precision(provider: Any, engine_options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """`provider="openvino:bf16"` (the command line's spelling) -> ("openvino", options with inference_precision
    "bf16"); a suffix that disagrees with an explicit `inference_precision` is refused. Other providers unchanged."""
    from diffrt.runtime.engines import PRECISION_PROVIDERS, split_precision

    if not isinstance(provider, str) or provider.partition(":")[0].lower() not in PRECISION_PROVIDERS:
        return provider, engine_options
    name, precision = split_precision(provider)
    given = engine_options.get("inference_precision")
    if precision and given is not None and given != precision["inference_precision"]:
        raise InputError(f"`inference_precision` {given!r} contradicts `provider` {provider!r}; give the precision "
                         "once")
    return name, {**engine_options, **precision}


def check_provider(provider: Any) -> None:
    """An unavailable provider is a ValueError naming it, before any engine is built (never a silent fallback)."""
    from diffrt.runtime.engines import check_provider as _check

    try:
        _check(provider)
    except InputError:
        raise
    except Exception as error:  # EngineError from the engine layer: re-raise as a ValueError for callers
        raise InputError(str(error)) from error


CUDA_PROVIDER_NAMES = ("cuda", "cudaexecutionprovider", "tensorrt", "tensorrtexecutionprovider")
# every provider that runs on an NVIDIA GPU: ONNX Runtime's, and diffrt's native TensorRT engine
GPU_PROVIDER_NAMES = (*CUDA_PROVIDER_NAMES, "trt")


def check_package_target(package: ModelPackage, provider: Any) -> None:
    """A `--target cuda` package holds ONNX Runtime kernels that exist on CUDA only: say so before loading."""
    if (package.manifest or {}).get("target") != "cuda":
        return
    name = provider_name(provider)
    if name == "auto":
        from diffrt.runtime.engines import auto_provider

        name = auto_provider()
    if name.lower() not in CUDA_PROVIDER_NAMES:
        raise InputError(
            f"`provider` {name!r} cannot run this package: it was exported with --target cuda, whose UNet and VAE "
            "use ONNX Runtime's CUDA-only kernels (GroupNorm, NhwcConv); use provider 'cuda', or export with "
            "--target onnxruntime for other providers"
        )
