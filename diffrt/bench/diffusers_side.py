"""The comparison sides: the Diffusers PyTorch pipeline, and Optimum's ONNX Runtime pipeline when installed.

Diffusers exposes no stage times, so they are taken around the same calls diffrt times: the text encoders' and
the UNet's (SD3 / FLUX: the transformer's) `forward` (forward hooks), `vae.decode` and `scheduler.step`. A
checkpoint saved without an optional model (SD3's T5, `text_encoder_3`) loads with it as None, so Diffusers runs
without it as the package does. Everything else inside the call (prompt
and latent preparation, the CFG combine, image post-processing) is the residual `host`. On CPU the pipeline runs
in float32; on a GPU in float16 with PyTorch SDPA attention (Diffusers' default), with a device synchronize at
every stage boundary so the times are the device's. torch is imported here only, in the comparison process.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from diffrt.bench.side import GpuMemoryOnce, RunConfig, control_inputs, peak_rss_mb, save_image
from diffrt.errors import InputError
from diffrt.package.names import INDEX_NAME

logger = logging.getLogger(__name__)


class _StageClock:
    """Accumulates seconds per stage for one call, plus per-step UNet and scheduler times."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.reset()

    def reset(self) -> None:
        self.stages: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._open: dict[str, float] = {}

    def start(self, name: str) -> None:
        self.sync()
        self._open[name] = time.perf_counter()

    def stop(self, name: str) -> float:
        self.sync()
        seconds = time.perf_counter() - self._open.pop(name)
        self.stages[name] = self.stages.get(name, 0.0) + seconds
        return seconds

    def time_module(self, module: Any, name: str) -> None:
        def after(*_: Any) -> None:  # a forward hook that returns a value would replace the output
            seconds = self.stop(name)
            if name == "unet":
                self.steps.append({"unet": seconds})

        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(after)

    def time_method(self, owner: Any, method: str, name: str) -> None:
        original = getattr(owner, method)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start(name)
            try:
                return original(*args, **kwargs)
            finally:
                seconds = self.stop(name)
                if name == "scheduler" and self.steps:
                    self.steps[-1]["scheduler"] = seconds

        setattr(owner, method, timed)


def absent_components(checkpoint: str) -> dict[str, None]:
    """`name=None` for each model the checkpoint's model_index.json lists as absent ([null, null]) that its pipeline
    class does not treat as optional: Diffusers refuses to load such a folder (SD3 saved without `text_encoder_3`)
    unless the caller passes None, which runs the pipeline without it (SD3: zero T5 embeddings)."""
    import diffusers

    index = json.loads((Path(checkpoint) / INDEX_NAME).read_text())
    optional = set(getattr(getattr(diffusers, str(index.get("_class_name")), None), "_optional_components", ()))
    return {name: None for name, value in index.items()
            if not name.startswith("_") and value == [None, None] and name not in optional}


def denoiser(pipe: Any) -> Any:
    """The pipeline's UNet, or its transformer (SD3 / FLUX)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


class DiffusersSide:
    """`diffusers.DiffusionPipeline` on the same checkpoint the package was exported from."""

    def __init__(self, config: RunConfig):
        if not config.checkpoint:
            raise InputError("--compare diffusers needs the source checkpoint of the package (a preset has it; "
                             "for a package folder pass --checkpoint DIR)")
        self.config = config
        self.pipe: Any = None
        self.torch: Any = None
        self._device_memory = GpuMemoryOnce(config.on_gpu)  # before torch creates its CUDA context

    def load(self) -> None:
        import diffusers
        import torch

        cfg = self.config
        self.torch = torch
        torch.set_num_threads(cfg.threads)
        device, dtype = ("cuda", torch.float16) if cfg.on_gpu else ("cpu", torch.float32)
        nets = self._controlnets(dtype)
        if nets:  # the checkpoint's own pipeline class, as its ControlNet variant (what AutoPipeline maps it to)
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
                cfg.checkpoint, controlnet=nets[0] if len(nets) == 1 else nets, torch_dtype=dtype).to(device)
        else:
            pipe = diffusers.DiffusionPipeline.from_pretrained(cfg.checkpoint, torch_dtype=dtype,
                                                               **absent_components(str(cfg.checkpoint))).to(device)
        if cfg.scheduler:
            pipe.scheduler = getattr(diffusers, cfg.scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.clock = _StageClock(sync)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(pipe, name, None) is not None:
                self.clock.time_module(getattr(pipe, name), "text_encoder")
        # SD3 / FLUX: the transformer, timed under the stage name diffrt's shared loop uses for every denoiser
        self.clock.time_module(denoiser(pipe), "unet")
        for net in nets:
            self.clock.time_module(net, "controlnet")
        self.clock.time_method(pipe.vae, "decode", "vae_decode")
        self.clock.time_method(pipe.scheduler, "step", "scheduler")
        self.pipe, self.device = pipe, device

    def run_once(self) -> dict[str, Any]:
        cfg, torch = self.config, self.torch
        self.clock.reset()
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe(cfg.prompt, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
                            guidance_scale=cfg.guidance, num_images_per_prompt=cfg.batch, generator=generator,
                            **control_inputs(cfg))
        self.clock.sync()
        total = time.perf_counter() - start
        save_image(cfg, out.images[0])
        stages = dict(self.clock.stages)
        stages["host"] = max(total - sum(stages.values()), 0.0)
        return {"total": total, "stages": stages, "steps": self.clock.steps}

    def _controlnets(self, dtype: Any) -> list[Any]:
        """The package's ControlNets as Diffusers models, from the folders its manifest records."""
        import diffusers

        missing = [name for name, source in zip(self.config.controlnets, self.config.controlnet_sources) if not source]
        if missing:
            raise InputError(f"--compare diffusers needs each ControlNet's diffusers folder; the package records none "
                             f"for controlnet_{missing[0]} (export it from a local folder, or use a preset)")
        return [diffusers.ControlNetModel.from_pretrained(source, torch_dtype=dtype)
                for source in self.config.controlnet_sources]

    def memory(self) -> dict[str, float]:
        out = {"peak_rss_mb": peak_rss_mb(), **self._device_memory.read()}
        if self.device == "cuda":  # PyTorch's own count (tensors only), beside the device-wide figure
            out["torch_max_allocated_mb"] = self.torch.cuda.max_memory_allocated() / 2**20
        return out

    def info(self) -> dict[str, Any]:
        import diffusers

        torch = self.torch
        return {"library": "diffusers", "diffusers": diffusers.__version__, "torch": torch.__version__,
                "device": self.device, "dtype": str(denoiser(self.pipe).dtype), "threads": torch.get_num_threads(),
                "pipeline": type(self.pipe).__name__,
                "scheduler": type(self.pipe.scheduler).__name__,
                "attention": "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"}


class OptimumSide(DiffusersSide):
    """Optimum's `ORTDiffusionPipeline` on the package folder itself (the layouts are compatible)."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.pipe = None

    def load(self) -> None:
        try:
            from optimum.onnxruntime import ORTDiffusionPipeline
        except ImportError as error:
            raise InputError("--compare optimum needs `optimum[onnxruntime]` installed") from error
        cfg = self.config
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cfg.threads
        provider = "CUDAExecutionProvider" if cfg.on_gpu else "CPUExecutionProvider"
        pipe = ORTDiffusionPipeline.from_pretrained(cfg.package, provider=provider, session_options=options)
        pipe.set_progress_bar_config(disable=True)
        self.clock = _StageClock(lambda: None)
        self.clock.time_method(pipe.scheduler, "step", "scheduler")
        for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
            model = getattr(pipe, name, None)
            if model is not None:
                stage = {"text_encoder_2": "text_encoder", "vae_decoder": "vae_decode"}.get(name, name)
                self._time_call(model, stage)
        self.pipe, self.device = pipe, "cpu"

    def _time_call(self, model: Any, stage: str) -> None:
        original = model.forward
        clock = self.clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            clock.start(stage)
            try:
                return original(*args, **kwargs)
            finally:
                seconds = clock.stop(stage)
                if stage == "unet":
                    clock.steps.append({"unet": seconds})

        model.forward = timed

    def run_once(self) -> dict[str, Any]:
        import numpy as np

        cfg = self.config
        self.clock.reset()
        start = time.perf_counter()
        self.pipe(cfg.prompt, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
                  guidance_scale=cfg.guidance, num_images_per_prompt=cfg.batch,
                  generator=np.random.RandomState(cfg.seed))
        total = time.perf_counter() - start
        stages = dict(self.clock.stages)
        stages["host"] = max(total - sum(stages.values()), 0.0)
        return {"total": total, "stages": stages, "steps": self.clock.steps}

    def memory(self) -> dict[str, float]:
        return {"peak_rss_mb": peak_rss_mb()}

    def info(self) -> dict[str, Any]:
        import optimum

        return {"library": "optimum", "optimum": getattr(optimum, "__version__", "?"), "threads": self.config.threads,
                "scheduler": type(self.pipe.scheduler).__name__}
