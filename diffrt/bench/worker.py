"""One side of a benchmark, in its own process: load, make the first image, then answer `run` requests.

Protocol (JSON lines): the worker writes `{"event": "ready", "cold_start": ..., "info": ...}` after loading and
making its first image, then one sample per `{"cmd": "run"}` line read on stdin, and exits on `{"cmd": "quit"}` or
end of input. Everything else a library prints goes to stderr, so stdout carries the protocol only.
`python -m diffrt.bench.worker SIDE CONFIG_JSON`; SIDE is `diffrt` (this module, torch-free), `diffusers` or
`optimum`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, TextIO

from diffrt.bench.side import GpuMemoryOnce, RunConfig, Side, control_inputs, peak_rss_mb, save_image

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

class DiffrtSide:
    """diffrt's runtime pipeline; its stage times come from the pipeline itself (`PipelineOutput.timings`)."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.pipe: Any = None
        self._steps: list[dict[str, float]] = []
        self._device_memory = GpuMemoryOnce(config.on_gpu)

    def load(self) -> None:
        from diffrt.runtime.pipelines.base import DiffusionPipeline
        from diffrt.schedulers import get_scheduler_class

        cfg = self.config
        options: dict[str, Any] = {"threads": cfg.threads}
        if cfg.precision is not None:
            options["inference_precision"] = cfg.precision
        if cfg.cache_dir is not None and cfg.provider.lower() != "trt":  # TensorRT plans are compiled already
            options["optimized_model_cache"] = cfg.cache_dir
        if cfg.provider.lower() == "openvino":
            # The benchmarked size is fixed, as in a fixed-size service: one compiled model for that shape is
            # OpenVINO's fastest setup (what provider "auto" picks too).
            options["static_shapes"] = True
        if cfg.vae != "full":
            options["vae"] = cfg.vae
        options.update({flag: True for flag in cfg.engine_flags})
        options.update(cfg.engine_options)
        if cfg.component_options:
            options["component_options"] = cfg.component_options
        if cfg.controlnets:
            options["controlnet"] = list(cfg.controlnets)
        pipe = DiffusionPipeline.from_pretrained(cfg.package, provider=cfg.provider, **options)
        if cfg.scheduler:
            scheduler_class = get_scheduler_class(cfg.scheduler)
            pipe.scheduler = scheduler_class.from_config(pipe.package.scheduler_config)
        # Session creation (graph optimisation: a minute for a real-size UNet) counts as package load, not as the
        # first UNet step.
        pipe.load_engines()
        pipe.set_progress_bar_config(disable=True)
        unet = pipe.engine(pipe.denoiser_name)  # the UNet, or SD3 / FLUX's transformer

        def record_step(index: int, seconds: dict[str, float]) -> None:
            transfer = getattr(unet, "last_transfer_seconds", None)
            if transfer is not None:  # GPU engines: the copies inside that UNet call
                seconds["unet_transfer"] = transfer
            self._steps.append(seconds)

        pipe.step_hook = record_step
        self.pipe = pipe

    def run_once(self) -> dict[str, Any]:
        cfg = self.config
        self._steps = []
        start = time.perf_counter()
        deep_cache = {"deep_cache_interval": cfg.deep_cache_interval} if cfg.deep_cache_interval else {}
        out = self.pipe(cfg.prompt, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
                        guidance_scale=cfg.guidance, num_images_per_prompt=cfg.batch, generator=cfg.seed,
                        **control_inputs(cfg), **deep_cache)
        total = time.perf_counter() - start
        save_image(cfg, out.images[0])
        return {"total": total, "stages": dict(out.timings), "steps": self._steps}

    def memory(self) -> dict[str, float]:
        """Peak RSS; on a GPU also the device memory this side holds after its first image (`GpuMemoryOnce`)."""
        return {"peak_rss_mb": peak_rss_mb(), **self._device_memory.read()}

    def info(self) -> dict[str, Any]:
        from importlib import metadata

        engine = self.pipe.engine(self.pipe.denoiser_name)
        versions = {}
        for name in ("onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "tensorrt-cu12"):
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return {"library": "diffrt", **versions, "provider": self.config.provider,
                "engine": type(engine).__name__, "precision": _package_precision(self.pipe, engine),
                "pipeline": type(self.pipe).__name__, "denoiser": self.pipe.denoiser_name,
                "vae": self.config.vae, "controlnets": list(self.config.controlnets),
                "deep_cache_interval": self.config.deep_cache_interval,
                "session_providers": list(getattr(getattr(engine, "session", None), "get_providers", list)()),
                "cuda_graph": getattr(engine, "cuda_graph_active", None),
                "scheduler": type(self.pipe.scheduler).__name__, "threads": self.config.threads,
                "torch_imported": "torch" in sys.modules}


def _package_precision(pipe: Any, engine: Any) -> str:
    """The precision the denoiser runs in: the engine's own setting (OpenVINO), else the package's export precision."""
    own = getattr(engine, "inference_precision", None)
    if own is not None:
        return str(own)
    manifest = pipe.package.component(pipe.denoiser_name).manifest or {}
    return str(manifest.get("precision", "fp32"))


def make_side(name: str, config: RunConfig) -> Side:
    if name == "diffrt":
        return DiffrtSide(config)
    if name == "diffusers":
        from diffrt.bench.diffusers_side import DiffusersSide

        return DiffusersSide(config)
    if name == "optimum":
        from diffrt.bench.diffusers_side import OptimumSide

        return OptimumSide(config)
    raise ValueError(f"unknown side {name!r}")


def serve(side: Side, out: TextIO, read_line: Callable[[], str], memory: Callable[[], dict[str, float]]) -> None:
    """Load, first image (the cold start), then one sample per `run` command."""
    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    start = time.perf_counter()
    side.load()
    load_s = time.perf_counter() - start
    first = side.run_once()
    first.update(memory())
    send({"event": "ready", "cold_start": {"load_s": load_s, "first_image_s": first["total"]},
          "first": first, "info": side.info()})
    while True:
        line = read_line()
        if not line or json.loads(line).get("cmd") == "quit":
            return
        sample = side.run_once()
        sample.update(memory())
        send({"event": "sample", **sample})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    name, config = argv[0], RunConfig(**json.loads(argv[1]))
    out, sys.stdout = sys.stdout, sys.stderr  # keep library prints off the protocol stream
    try:
        side = make_side(name, config)
        memory: Callable[[], dict[str, float]] = getattr(side, "memory", lambda: {"peak_rss_mb": peak_rss_mb()})
        serve(side, out, sys.stdin.readline, memory)
    except Exception as error:  # reported to the parent, which raises it as a typed error
        out.write(json.dumps({"event": "error", "type": type(error).__name__, "message": str(error)}) + "\n")
        out.flush()
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
