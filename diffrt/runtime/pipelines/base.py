"""The pipeline base: package loading, engines, the scheduler, and the denoising loop every pipeline shares."""
from __future__ import annotations

import inspect
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from diffrt import rng
from diffrt.errors import InputError, PackageError
from diffrt.package.reader import ModelPackage
from diffrt.runtime.engines import create_engine
from diffrt.runtime.engines.base import Engine
from diffrt.runtime.hub import resolve_package
from diffrt.runtime.pipelines.guidance import combine_cfg
from diffrt.runtime.pipelines.prompts import TextEncoder
from diffrt.runtime.pipelines.vae import check_vae, vae_components, vae_config
from diffrt.runtime.pipelines.weighted_prompts import DEFAULT_MAX_CHUNKS
from diffrt.runtime.prompt_chunks import CHUNK_LENGTH
from diffrt.runtime.tokenizer import CLIPTokenizer
from diffrt.schedulers import from_config as scheduler_from_config
from diffrt.schedulers.protocol import Scheduler

logger = logging.getLogger(__name__)

# callback tensor name (Diffusers) -> UNet feed it stands for
CALLBACK_FEEDS = {"prompt_embeds": "encoder_hidden_states", "add_text_embeds": "text_embeds",
                  "add_time_ids": "time_ids"}


@dataclass
class PipelineOutput:
    """`images` as in Diffusers; `timings` holds seconds per stage of this call."""

    images: Any
    timings: dict[str, float] = field(default_factory=dict)
    nsfw_content_detected: None = None


@dataclass
class DenoiseState:
    """What one call's loop needs besides the latents: UNet feeds (CFG-doubled) and guidance settings."""

    feeds: dict[str, np.ndarray]
    guidance_scale: float
    do_cfg: bool
    guidance_rescale: float = 0.0
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    # Inpaint UNets take mask + masked-image latents as extra input channels.
    extra_channels: np.ndarray | None = None
    # Legacy inpainting with a 4-channel UNet blends the known region back after each step.
    blend: Callable[[np.ndarray, int], np.ndarray] | None = None


def read_only_copy(array: np.ndarray) -> np.ndarray:
    copy = np.array(array, copy=True)
    copy.flags.writeable = False
    return copy


def to_generator(generator: Any) -> Any:
    """An int seed becomes a torch-CPU-compatible generator; lists are converted element-wise."""
    if isinstance(generator, list):
        return [to_generator(g) for g in generator]
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return rng.Generator("cpu").manual_seed(int(generator))
    return generator


def randn_tensor(shape: Sequence[int], generator: Any) -> np.ndarray:
    """Diffusers' `randn_tensor`: with a list of generators, row i is drawn from generator i."""
    return rng.randn(tuple(shape), generator=generator)


class DiffusionPipeline:
    """Loads a model package and runs it; `from_pretrained` picks the concrete class from `model_index.json`."""

    #: components a package must have for this class (checked before any engine is created)
    required_components: tuple[str, ...] = ()
    #: callback tensor names this pipeline can hand to `callback_on_step_end`
    _callback_tensor_inputs: tuple[str, ...] = ("latents", "prompt_embeds")
    #: optional `step_hook(step_index, seconds_by_stage)`, called after each denoising step with that step's
    #: stage times (the per-step samples of `diffrt bench`); None costs nothing
    step_hook: Callable[[int, dict[str, float]], None] | None = None

    def __init__(
        self,
        package: ModelPackage,
        provider: str | Sequence[Any] = "cpu",
        scheduler: Scheduler | None = None,
        vae: str = "full",
        **engine_options: Any,
    ) -> None:
        """`vae` "full" (the package's VAE) or "tiny" (its vae_decoder_tiny / vae_encoder_tiny, TAESD)."""
        self.vae_components = vae_components(package, vae, self.required_components)
        package.require(*(self.vae_components.get(name, name) for name in self.required_components))
        self.vae = vae
        self.package = package
        self.provider = provider
        self.engine_options = engine_options
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {}
        self.scheduler = scheduler if scheduler is not None else scheduler_from_config(package.scheduler_config)
        self.vae_config: dict[str, Any] = vae_config(package, self.vae_components)
        self.unet_config: dict[str, Any] = package.unet_config
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        check_provider(provider)
        check_package_target(package, provider)

    # ----- construction -----
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        provider: str | Sequence[Any] = "cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        scheduler: Scheduler | None = None,
        vae: str = "full",
        **engine_options: Any,
    ) -> "DiffusionPipeline":
        """Open a package folder or Hub repo id; generic classes dispatch on the package's pipeline class.

        `vae="tiny"` decodes and encodes with the package's tiny autoencoder (exported with `--tiny-vae`).
        """
        check_provider(provider)
        check_vae(vae)
        path = resolve_package(pretrained_model_name_or_path, revision=revision, token=token)
        package = ModelPackage.open(path)
        target = cls._resolve_class(package.pipeline_class)
        return target(package, provider=provider, scheduler=scheduler, vae=vae, **engine_options)

    @classmethod
    def _resolve_class(cls, pipeline_class: str) -> type["DiffusionPipeline"]:
        from diffrt.runtime.pipelines.registry import pipeline_class_for

        if cls.required_components:  # a concrete class: use it as asked, like Diffusers
            return cls
        return pipeline_class_for(pipeline_class)

    # ----- components -----
    def engine(self, name: str) -> Engine:
        """The engine of component `name`, created on first use and shared by all calls (thread-safe)."""
        engine = self._engines.get(name)
        if engine is None:
            with self._lock:
                engine = self._engines.get(name)
                if engine is None:
                    component = self.package.component(name)
                    engine = create_engine(component, provider=self.provider, **self.engine_options)
                    self._engines[name] = engine
        return engine

    def has_component(self, name: str) -> bool:
        return self.package.has(name)

    def text_encoder(self, name: str, tokenizer_name: str) -> TextEncoder:
        tokenizer = CLIPTokenizer.from_folder(self.package.tokenizer_dir(tokenizer_name))
        batch_range = self.package.component(name).dim_ranges.get("batch")
        return TextEncoder(tokenizer, self.engine(name), batch_range[1] if batch_range else None)

    def max_prompt_chunks(self) -> int:
        """How many 77-token chunks the UNet's `encoder_hidden_states` may hold (weighted, long prompts)."""
        sequence = self.package.component("unet").dim_ranges.get("sequence")
        return sequence[1] // CHUNK_LENGTH if sequence else DEFAULT_MAX_CHUNKS

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Generate images; each concrete pipeline defines its own arguments (Diffusers' `__call__`)."""
        raise NotImplementedError(f"{type(self).__name__} is a base class: open a package with `from_pretrained`")

    def warmup(self, **call_arguments: Any) -> float:
        """One short call with these arguments (size, batch, guidance, ...; a 1-step text-to-image by default) so
        every engine prepares that shape before real traffic: cuDNN's algorithm search, the CUDA graph capture,
        OpenVINO's static-shape compile. Returns the seconds it took."""
        arguments = {"prompt": "", "num_inference_steps": 1, "output_type": "np", **call_arguments}
        start = time.perf_counter()
        previous = self._progress
        self._progress = {**previous, "disable": True}
        try:
            self(**arguments)
        finally:
            self._progress = previous
        return time.perf_counter() - start

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress = dict(kwargs)

    @contextmanager
    def _stage(self, timings: dict[str, float], name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

    # ----- shared steps -----
    def default_size(self) -> int:
        sample_size = self.unet_config.get("sample_size", 64)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    def fresh_scheduler(self) -> Any:
        """Each call runs on its own clone, so one pipeline serves concurrent calls."""
        return self.scheduler.clone()

    def set_timesteps(self, scheduler: Scheduler, num_inference_steps: int, timesteps: Any, sigmas: Any) -> np.ndarray:
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps)
        elif sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas)
        else:
            scheduler.set_timesteps(num_inference_steps)
        return np.asarray(scheduler.timesteps)

    def step_kwargs(self, scheduler: Scheduler, generator: Any, eta: float) -> dict[str, Any]:
        """Pass `eta` / `generator` only to schedulers whose `step` takes them (Diffusers' rule)."""
        params = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def prepare_latents(self, shape: tuple[int, ...], generator: Any, latents: Any, scheduler: Scheduler) -> np.ndarray:
        if latents is None:
            latents = randn_tensor(shape, generator)
        latents = np.asarray(latents, dtype=np.float32)
        return (latents * np.float32(scheduler.init_noise_sigma)).astype(np.float32, copy=False)

    def run_unet(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        engine = self.engine("unet")
        dtypes = {spec.name: spec.dtype for spec in engine.inputs}
        cast = {k: (v.astype(dtypes[k], copy=False) if k in dtypes else v) for k, v in feeds.items()}
        return np.asarray(engine.run(cast)["out_sample"], dtype=np.float32)

    def denoise(
        self,
        scheduler: Scheduler,
        latents: np.ndarray,
        timesteps: np.ndarray,
        state: DenoiseState,
        callback_on_step_end: Callable | None,
        callback_inputs: Sequence[str],
        timings: dict[str, float],
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The loop of every pipeline; returns the final latents and the last predicted x0 (LCM decodes it)."""
        denoised = None
        # The conditioning stays the same through the loop: read-only copies let a GPU engine keep it on the device
        # without comparing it every step (see DeviceIO).
        state.feeds = {name: read_only_copy(value) for name, value in state.feeds.items()}
        hook = self.step_hook
        for i, t in enumerate(self._progress_bar(timesteps)):
            before = dict(timings) if hook is not None else None
            with self._stage(timings, "host"):
                model_input = np.concatenate([latents, latents]) if state.do_cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                if state.extra_channels is not None:
                    model_input = np.concatenate([model_input, state.extra_channels], axis=1)
                feeds = dict(state.feeds, sample=model_input)
                feeds["timestep"] = np.full((model_input.shape[0],), t, dtype=np.float32)
            with self._stage(timings, "unet"):
                noise_pred = self.run_unet(feeds)
            with self._stage(timings, "host"):
                if state.do_cfg:
                    noise_pred = combine_cfg(noise_pred, state.guidance_scale, state.guidance_rescale)
            with self._stage(timings, "scheduler"):
                out = scheduler.step(noise_pred, t, latents, **state.step_kwargs)
            latents, denoised = out.prev_sample, out.pred_original_sample
            if state.blend is not None:
                latents = state.blend(latents, i)
            if callback_on_step_end is not None:
                latents = self._callback(callback_on_step_end, i, t, latents, state, callback_inputs)
            if hook is not None and before is not None:
                hook(i, {k: v - before.get(k, 0.0) for k, v in timings.items() if v != before.get(k)})
        return latents, denoised

    def _callback(
        self, callback: Callable, i: int, t: Any, latents: np.ndarray, state: DenoiseState, names: Sequence[str]
    ) -> np.ndarray:
        values = {n: latents if n == "latents" else state.feeds[CALLBACK_FEEDS[n]] for n in names}
        result = callback(self, i, t, values) or {}
        for name, value in result.items():
            if name == "latents":
                latents = np.asarray(value, dtype=np.float32)
            elif name in CALLBACK_FEEDS:
                state.feeds[CALLBACK_FEEDS[name]] = np.asarray(value, dtype=np.float32)
        return latents

    def _progress_bar(self, items: Iterable[Any]) -> Any:
        return tqdm(items, **{"leave": False, **self._progress})

    def unscale_latents(self, latents: np.ndarray) -> np.ndarray:
        """Undo the VAE latent normalisation (scaling_factor, optional latents_mean/std and shift_factor)."""
        scaling = np.float32(self.vae_config.get("scaling_factor", 0.18215))
        mean, std = self.vae_config.get("latents_mean"), self.vae_config.get("latents_std")
        if mean is not None and std is not None:
            mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
            return latents * std / scaling + mean
        shift = self.vae_config.get("shift_factor")
        return latents / scaling + (np.float32(shift) if shift is not None else np.float32(0))

    def scale_latents(self, latents: np.ndarray) -> np.ndarray:
        scaling = np.float32(self.vae_config.get("scaling_factor", 0.18215))
        mean, std = self.vae_config.get("latents_mean"), self.vae_config.get("latents_std")
        if mean is not None and std is not None:
            mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
            std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
            return (latents - mean) * scaling / std
        shift = self.vae_config.get("shift_factor")
        return (latents - (np.float32(shift) if shift is not None else np.float32(0))) * scaling

    def decode(self, latents: np.ndarray) -> np.ndarray:
        engine = self.engine(self.vae_components["vae_decoder"])
        dtype = next(s.dtype for s in engine.inputs if s.name == "latent_sample")
        image = engine.run({"latent_sample": self.unscale_latents(latents).astype(dtype, copy=False)})["sample"]
        return np.asarray(image, dtype=np.float32)

    def encode_image(self, image: np.ndarray, generator: Any, sample: bool = True) -> np.ndarray:
        """VAE-encode a [-1, 1] NCHW batch and draw from the latent distribution (Diffusers' `retrieve_latents`)."""
        engine = self.engine(self.vae_components["vae_encoder"])
        dtype = next(s.dtype for s in engine.inputs if s.name == "sample")
        if self.vae == "tiny":  # the tiny encoder gives the latents themselves: nothing to sample
            return np.asarray(engine.run({"sample": image.astype(dtype, copy=False)})["latents"], np.float32)
        if isinstance(generator, list):
            rows = [self.encode_image(image[i : i + 1], generator[i], sample) for i in range(image.shape[0])]
            return np.concatenate(rows, axis=0)
        moments = np.asarray(engine.run({"sample": image.astype(dtype, copy=False)})["latent_parameters"], np.float32)
        mean, logvar = np.split(moments, 2, axis=1)
        if not sample:
            return mean
        std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
        return mean + std * rng.randn(mean.shape, generator=generator)


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


def check_package_target(package: ModelPackage, provider: Any) -> None:
    """A `--target cuda` package holds ONNX Runtime kernels that exist on CUDA only: say so before loading."""
    if (package.manifest or {}).get("target") != "cuda":
        return
    first = provider if isinstance(provider, str) else next(iter(provider), "")
    name = first if isinstance(first, str) else first[0]
    if name.lower() == "auto":
        from diffrt.runtime.engines import auto_provider

        name = auto_provider()
    if name.lower() not in CUDA_PROVIDER_NAMES:
        raise InputError(
            f"`provider` {name!r} cannot run this package: it was exported with --target cuda, whose UNet and VAE "
            "use ONNX Runtime's CUDA-only kernels (GroupNorm, NhwcConv); use provider 'cuda', or export with "
            "--target onnxruntime for other providers"
        )


def require_component(pipeline: DiffusionPipeline, name: str, reason: str) -> None:
    if not pipeline.has_component(name):
        raise PackageError(f"this package has no `{name}` component, needed for {reason}")
