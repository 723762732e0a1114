"""What every benchmark side shares: the run configuration, the Side protocol, and the per-process measurements
(peak RSS, device memory, the saved image) — imported by the diffrt worker and the comparison sides alike."""
from __future__ import annotations

import io
import json
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from diffrt.package.files import write_bytes

PROMPT = "a photo of an astronaut riding a horse on the moon, high quality"
#: providers that run on the CPU (everything else is a GPU provider: fp16 packages, Diffusers on CUDA)
CPU_PROVIDERS = ("cpu", "cpuexecutionprovider", "openvino", "auto")


@dataclass(frozen=True)
class RunConfig:
    """What both sides run: the same prompt, seed, size, scheduler, steps and thread count."""

    package: str
    checkpoint: str | None
    provider: str = "cpu"
    #: the engine's inference precision (OpenVINO: fp32 / bf16 / auto); None: the engine's default
    precision: str | None = None
    #: "full" (the package's VAE) or "tiny" (its TAESD components)
    vae: str = "full"
    steps: int = 20
    height: int = 512
    width: int = 512
    batch: int = 1
    guidance: float = 7.5
    scheduler: str | None = None
    threads: int = 1
    seed: int = 0
    prompt: str = PROMPT
    #: this side's name in the record (also the file name of its saved image)
    side: str = "diffrt"
    #: where each side saves its image (uint8 .npy) for the quality comparison; None: not saved
    image_dir: str | None = None
    #: compiled/optimised-model cache of the diffrt engines (start-up without re-optimising); None: no cache
    cache_dir: str | None = None
    #: boolean engine options switched on for this side (`cuda_graph`, `prefer_nhwc`: `--provider cuda:graph+nhwc`)
    engine_flags: tuple[str, ...] = ()
    #: the package's ControlNets to run (names, without `controlnet_`); empty: text-to-image alone
    controlnets: tuple[str, ...] = ()
    #: the same ControlNets' diffusers folders, for the Diffusers side ("" where the package records none)
    controlnet_sources: tuple[str, ...] = ()
    #: `--engine-option` values for the diffrt sides: options of every engine, and {component: options}
    engine_options: dict[str, Any] = field(default_factory=dict)
    component_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: DeepCache's interval on the diffrt side (None: off; the compared libraries always run the full UNet)
    deep_cache_interval: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.provider.lower() not in CPU_PROVIDERS

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def control_inputs(config: RunConfig) -> dict[str, Any]:
    """The ControlNet call arguments both sides get: one control picture per ControlNet (a seeded random RGB image
    of the run's size: a ControlNet sees every pixel, so its cost and its effect do not depend on the content)."""
    if not config.controlnets:
        return {}
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.random.default_rng(config.seed + 1 + k).integers(
        0, 256, (config.height, config.width, 3), dtype=np.uint8)) for k in range(len(config.controlnets))]
    return {"image": images[0] if len(images) == 1 else images}


class Side(Protocol):
    def load(self) -> None: ...
    def run_once(self) -> dict[str, Any]: ...
    def info(self) -> dict[str, Any]: ...


def save_image(config: RunConfig, image: Any) -> None:
    """Save a side's image once (every run of a side makes the same image: same seed) for the PSNR comparison."""
    if config.image_dir is None:
        return
    import numpy as np

    path = os.path.join(config.image_dir, f"{config.side}.npy")
    if not os.path.exists(path):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(image, dtype=np.uint8))
        write_bytes(Path(path), buffer.getvalue())


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class GpuMemoryOnce:
    """The device memory a GPU side holds, read once: after its first image, before the next side loads (see
    `diffrt.bench.gpu_memory`). ONNX Runtime's arenas and PyTorch's caching allocator keep what they took, so for
    the benchmarked shape that is also the peak."""

    def __init__(self, on_gpu: bool):
        self._probe: Any = None
        if on_gpu:
            from diffrt.bench.gpu_memory import DeviceMemoryProbe

            self._probe = DeviceMemoryProbe()

    def read(self) -> dict[str, float]:
        if self._probe is None:
            return {}
        used, self._probe = self._probe.used_mb(), None
        return {} if used is None else {"peak_device_mb": used}
