"""The pipeline base: package loading, engines, the scheduler, and the denoising loop every pipeline shares."""
from __future__ import annotations

import inspect
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from diffrt import rng
from diffrt.errors import PackageError, invalid
from diffrt.package.names import RUN_ONCE_COMPONENTS, UNET_SHALLOW
from diffrt.package.reader import ModelPackage
from diffrt.runtime.adapters.package_weights import PackageWeights
from diffrt.runtime.adapters.state import AdapterState
from diffrt.runtime.engines import create_engine, is_onnxruntime_cpu
from diffrt.runtime.engines.base import Engine
from diffrt.runtime.loading import open_package
from diffrt.runtime.pipelines import calibration
from diffrt.runtime.pipelines.checks import PackageLimits, check_component_options
from diffrt.runtime.pipelines.components import AutoencoderComponent, EngineComponent
from diffrt.runtime.pipelines.deep_cache import DeepCacheRun, check_interval, check_schedule
from diffrt.runtime.pipelines.diffusers_api import CallState, DiffusersApi
from diffrt.runtime.pipelines.guidance import combine_cfg
from diffrt.runtime.pipelines.lora_api import LoraLoaderMixin
from diffrt.runtime.pipelines.prompts import TextEncoder
from diffrt.runtime.pipelines.providers import check_package_target, check_provider, split_provider_precision
from diffrt.runtime.pipelines.residuals import residual_specs, zero_residuals
from diffrt.runtime.pipelines.textual_inversion_api import TextualInversionMixin
from diffrt.runtime.pipelines.timestep import scalar_timestep
from diffrt.runtime.pipelines.vae import check_vae, vae_components, vae_config
from diffrt.runtime.pipelines.weighted_prompts import DEFAULT_MAX_CHUNKS
from diffrt.runtime.prompt_chunks import CHUNK_LENGTH
from diffrt.runtime.tokenizer import CLIPTokenizer
from diffrt.schedulers import from_config as scheduler_from_config
from diffrt.schedulers.protocol import Scheduler

logger = logging.getLogger(__name__)

LOAD_CHOICES = ("lazy", "eager")

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
    # ControlNet pipelines: (step index, t, scaled latents before extra channels, UNet feeds) -> residual feeds
    controlnet: Callable[[int, Any, np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    # DeepCache: the full UNet every this many steps, the package's shallow UNet between (None or 1: off)
    deep_cache_interval: int | None = None


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


class DiffusionPipeline(DiffusersApi, LoraLoaderMixin, TextualInversionMixin):
    """Loads a model package and runs it; `from_pretrained` picks the concrete class from `model_index.json`."""

    #: the component that predicts the noise (or velocity) each step
    denoiser_name: str = "unet"
    #: components a package must have for this class (checked before any engine is created)
    required_components: tuple[str, ...] = ()
    #: components this class runs when the package has them (SDXL's first text encoder)
    optional_components: tuple[str, ...] = ()
    # Diffusers' component attributes: views of the package's components (None when the package has none)
    unet: EngineComponent
    text_encoder: EngineComponent | None
    text_encoder_2: EngineComponent | None
    vae_decoder: EngineComponent | None
    vae_encoder: EngineComponent | None
    vae: AutoencoderComponent
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
        load: str = "lazy",
        release_memory: bool = True,
        component_options: dict[str, dict[str, Any]] | None = None,
        deep_cache_schedule: str = "uniform",
        **engine_options: Any,
    ) -> None:
        """`vae` "full" (the package's VAE) or "tiny" (its vae_decoder_tiny / vae_encoder_tiny, TAESD); `load`
        "lazy" (each engine is created on first use) or "eager" (all of them now, see `load_engines`).
        `release_memory` True: each stage hands its working memory back when it is done for the image (the UNet
        after the last step, the VAE after each call), so the resident memory between images is the weights and
        the peak is the weights plus the largest stage's; False keeps every engine's working memory for the next
        image (about 1 s less per SD 1.5 512x512 image on 2 cores, ~3.7 GiB more resident; docs/benchmarks.md).
        `engine_options` go to every engine; `component_options` {component: {option: value}} to one component's
        engine on top of them, e.g. `{"vae_decoder": {"graph_optimization_level": "extended"}}` (a lower VAE peak
        for a slower decode on ONNX Runtime; docs/benchmarks.md). `deep_cache_schedule` "uniform" or "nonuniform":
        which steps of a call with `deep_cache_interval` run the full UNet (`diffrt.runtime.pipelines.deep_cache`;
        also settable as an attribute)."""
        provider, engine_options = split_provider_precision(provider, engine_options)
        if load not in LOAD_CHOICES:
            raise invalid("load", "'lazy' (engines created on first use) or 'eager' (all at load)", load)
        if not isinstance(release_memory, bool):
            raise invalid("release_memory", "True or False", release_memory)
        self.release_memory = release_memory
        self.deep_cache_schedule = deep_cache_schedule
        self.vae_components = vae_components(package, vae, self.required_components)
        package.require(*(self.vae_components.get(name, name) for name in self.required_components))
        self.package = package
        self.provider = provider
        self.engine_options = engine_options
        self.component_options = check_component_options(component_options, package)
        self._engines: dict[str, Engine] = {}
        #: the adapter state each engine was created with (`AdapterState.signature`)
        self._engine_signatures: dict[str, Any] = {}
        self.adapters = AdapterState(PackageWeights(package))
        self._lock = threading.Lock()
        self._progress_bar_config: dict[str, Any] = {}
        self._call = CallState()
        self.scheduler = scheduler if scheduler is not None else scheduler_from_config(package.scheduler_config)
        self.vae_config: dict[str, Any] = vae_config(package, self.vae_components)
        # SD3 / FLUX packages denoise with a `transformer` (see `flow_base`): they have no UNet config
        self.unet_config: dict[str, Any] = package.unet_config if package.has("unet") else {}
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self.limits = PackageLimits(package, self.vae_scale_factor)
        self._attach_components(vae)
        check_provider(provider)
        check_package_target(package, provider)
        if load == "eager":
            self.load_engines()

    def _attach_components(self, vae: str) -> None:
        """`pipe.unet`, `pipe.text_encoder`, `pipe.vae`, ...: views that create no engine until used."""
        for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder",
                     "vae_encoder"):
            setattr(self, name, EngineComponent(self, name) if self.package.has(name) else None)
        if self.package.has("unet"):
            self.unet = EngineComponent(self, "unet", self.unet_config)
        self.vae = AutoencoderComponent(self, self.vae_components, self.vae_config, vae)

    @cached_property
    def tokenizer(self) -> CLIPTokenizer | None:
        """The first CLIP tokenizer (Diffusers' `pipe.tokenizer`), None when the package has no `tokenizer/`."""
        return self._tokenizer("tokenizer")

    @cached_property
    def tokenizer_2(self) -> CLIPTokenizer | None:
        return self._tokenizer("tokenizer_2")

    def _tokenizer(self, name: str) -> CLIPTokenizer | None:
        try:
            folder = self.package.tokenizer_dir(name)
        except PackageError:
            return None
        return CLIPTokenizer.from_folder(folder)

    # ----- construction -----
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        provider: str | Sequence[Any] = "cpu",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        subfolder: str | None = None,
        variant: str | None = None,
        verify: bool = False,
        scheduler: Scheduler | None = None,
        vae: str = "full",
        **engine_options: Any,
    ) -> "DiffusionPipeline":
        """Open a package folder or Hub repo id; generic classes dispatch on the package's pipeline class.

        Diffusers' Hub keywords apply (`revision`, `token`, `cache_dir`, `local_files_only`, `subfolder`; `variant`
        is the package's precision, "fp16" / "fp32" / "bf16"), see `diffrt.runtime.loading.open_package`.
        `verify=True` hashes every component file against the manifest (file sizes are always checked).
        `vae="tiny"` decodes and encodes with the package's tiny autoencoder (exported with `--tiny-vae`).
        `load="eager"` creates every engine now (ONNX Runtime sessions, OpenVINO compiles, TensorRT contexts)
        instead of at first use, so the first call runs at full speed; the default is `load="lazy"`.
        """
        provider, engine_options = split_provider_precision(provider, engine_options)
        check_provider(provider)
        check_vae(vae)
        package = open_package(pretrained_model_name_or_path, revision=revision, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only, subfolder=subfolder, variant=variant, verify=verify)
        target = cls._resolve_class(package.pipeline_class)
        return target(package, provider=provider, scheduler=scheduler, vae=vae, **engine_options)

    @classmethod
    def from_pipe(cls, pipeline: "DiffusionPipeline", **overrides: Any) -> "DiffusionPipeline":
        """This class on another pipeline's package, sharing its engines and scheduler (Diffusers' `from_pipe`):
        `StableDiffusionImg2ImgPipeline.from_pipe(text_to_image)` loads nothing again."""
        return pipe_as(cls._resolve_class(pipeline.package.pipeline_class), pipeline, overrides)

    @classmethod
    def _resolve_class(cls, pipeline_class: str) -> type["DiffusionPipeline"]:
        from diffrt.runtime.pipelines.registry import pipeline_class_for

        if cls.required_components:  # a concrete class: use it as asked, like Diffusers
            return cls
        return pipeline_class_for(pipeline_class)

    # ----- components -----
    def engine(self, name: str) -> Engine:
        """The engine of component `name`, created on first use and shared by all calls (thread-safe).
        The seconds spent creating it (or waiting for another thread to) count as this call's "load" stage."""
        engine = self._engines.get(name)
        if engine is None:
            start = time.perf_counter()
            with self._lock:
                engine = self._engines.get(name)
                if engine is None:
                    component = self.package.component(name)
                    signature = self.adapters.signature(name)
                    overrides = self.adapters.overrides(name) if signature != ((), ()) else {}
                    options = {**self.engine_options, **self.component_options.get(name, {}),
                               **({"initializers": overrides} if overrides else {})}
                    options = self._arena_option(name, options)
                    options = calibration.engine_options(self, name, options)
                    engine = create_engine(component, provider=self.provider, **options)
                    self._engine_signatures[name] = signature
                    # Engines open their model on first use (ONNX Runtime's session, OpenVINO's model read);
                    # reading the IO specs does it now, so that time is "load", not the stage that runs it.
                    _ = engine.inputs
                    self._engines[name] = engine
            self._call.load_seconds += time.perf_counter() - start
        return engine

    def _arena_option(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """ONNX Runtime CPU engines of components run once per image (text encoders, VAE) allocate without the
        arena while the pipeline releases memory: the same time for a lower peak (`OnnxRuntimeEngine`'s
        `memory_arena`). An explicit `memory_arena` option wins."""
        if self.release_memory and name in RUN_ONCE_COMPONENTS and is_onnxruntime_cpu(self.provider):
            return {"memory_arena": False, **options}
        return options

    def engine_names(self) -> list[str]:
        """The package components this pipeline runs (its VAE choice applied; DeepCache's shallow UNet where the
        package has one, as `deep_cache_interval` may run it)."""
        names = [self.vae_components.get(n, n) for n in self.required_components]
        names += [n for n in self.optional_components if self.package.has(n)]
        return names + ([UNET_SHALLOW] if "unet" in names and self.package.has(UNET_SHALLOW) else [])

    def load_engines(self) -> float:
        """Create every engine this pipeline runs now (what `load="eager"` does); returns the seconds it took."""
        start = time.perf_counter()
        for name in self.engine_names():
            self.engine(name)
        self._call.load_seconds = 0.0  # spent outside any call: not a call's "load" stage
        return time.perf_counter() - start

    def has_component(self, name: str) -> bool:
        return self.package.has(name)

    def prompt_encoder(self, name: str, tokenizer_name: str) -> TextEncoder:
        """Text encoder `name` with its tokenizer, as prompt encoding runs them (in slices of its batch range)."""
        tokenizer = getattr(self, tokenizer_name, None)
        if tokenizer is None:
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

    def warmup(self, height: int | None = None, width: int | None = None, batch_size: int = 1,
               **call_arguments: Any) -> float:
        """Create the engines and run one short call at this size and batch (images per call) so every engine
        has prepared that shape before real traffic: session creation, cuDNN's algorithm search, the CUDA graph
        capture, OpenVINO's static-shape compile. Image-to-image and inpainting pipelines get a gray image and
        mask of that size. Other call arguments (guidance_scale, ...) pass through. Returns the seconds it took."""
        warmup_call_arguments(self, height, width, batch_size, call_arguments)
        start = time.perf_counter()
        previous = self._progress_bar_config
        self._progress_bar_config = {**previous, "disable": True}
        try:
            self(**call_arguments)  # checks every argument before it creates an engine
        finally:
            self._progress_bar_config = previous
        self.load_engines()  # any engine this call did not need (an encoder a strength-1 inpaint skips)
        return time.perf_counter() - start

    @contextmanager
    def _stage(self, timings: dict[str, float], name: str) -> Iterator[None]:
        """Time one stage of a call; engine creation inside it goes to a separate "load" stage."""
        loaded = self._call.load_seconds
        start = time.perf_counter()
        try:
            yield
        finally:
            load = self._call.load_seconds - loaded
            self._call.load_seconds = loaded
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start - load
            if load:
                timings["load"] = timings.get("load", 0.0) + load

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

    def last_step(self, step_index: int) -> bool:
        """Whether a stage run at this denoising step should hand its working memory back (`release_memory`)."""
        count = self._call.num_timesteps
        return self.release_memory and count is not None and step_index == count - 1

    def denoiser_feeds(self, feeds: dict[str, np.ndarray], model_input: np.ndarray, t: Any) -> dict[str, np.ndarray]:
        """One step's denoiser feeds: the call's conditioning, the (scaled, CFG-doubled) latents and the timestep."""
        return dict(feeds, sample=model_input, timestep=np.full((model_input.shape[0],), t, dtype=np.float32))

    def run_denoiser(self, feeds: dict[str, np.ndarray], release_memory: bool = False) -> np.ndarray:
        """The noise (or velocity) prediction for one step: the UNet here, a transformer in SD3 / FLUX."""
        return self.run_unet(feeds, release_memory)

    def run_unet(self, feeds: dict[str, np.ndarray], release_memory: bool = False) -> np.ndarray:
        return self.unet_outputs(feeds, release_memory)["out_sample"]

    def unet_outputs(self, feeds: dict[str, np.ndarray], release_memory: bool = False,
                     component: str = "unet") -> dict[str, np.ndarray]:
        """Every output (float32) of the UNet, or of DeepCache's `unet_shallow`, for one step's feeds."""
        engine = self.engine(component)
        dtypes = {spec.name: spec.dtype for spec in engine.inputs}
        cast = {k: (v.astype(dtypes[k], copy=False) if k in dtypes else v) for k, v in feeds.items()}
        missing = [spec for spec in residual_specs(engine.inputs) if spec.name not in cast]
        if missing:  # a ControlNet package's UNet on a call that runs no ControlNet: nothing to add
            cast.update(zero_residuals(missing, cast["sample"].shape))
        out = engine.run(scalar_timestep(engine, cast), release_memory=release_memory)
        return {name: np.asarray(value, dtype=np.float32) for name, value in out.items()}

    @property
    def deep_cache_schedule(self) -> str:
        """Which steps of a call with `deep_cache_interval` run the full UNet: "uniform" or "nonuniform"
        (`diffrt.runtime.pipelines.deep_cache`); InputError naming it when set to anything else."""
        return self._deep_cache_schedule

    @deep_cache_schedule.setter
    def deep_cache_schedule(self, value: str) -> None:
        self._deep_cache_schedule = check_schedule(value)

    def check_deep_cache(self, deep_cache_interval: Any) -> int | None:
        """A call's `deep_cache_interval`, checked against this package (see `diffrt.runtime.pipelines.deep_cache`):
        an int >= 2, or None when off."""
        return check_interval(deep_cache_interval, self.package)

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
        call = self._call
        interval = state.deep_cache_interval
        deep_cache = (DeepCacheRun(interval, len(timesteps), self.deep_cache_schedule)
                      if interval is not None and interval > 1 else None)
        call.interrupt, call.num_timesteps = False, len(timesteps)
        call.guidance_scale, call.do_classifier_free_guidance = state.guidance_scale, state.do_cfg
        for i, t in enumerate(self.progress_bar(timesteps)):
            if call.interrupt:  # set by a callback (`pipe._interrupt = True`): skip the rest, as Diffusers does
                continue
            before = dict(timings) if hook is not None else None
            with self._stage(timings, "host"):
                model_input = np.concatenate([latents, latents]) if state.do_cfg else latents
                model_input = control_input = scheduler.scale_model_input(model_input, t)
                if state.extra_channels is not None:
                    model_input = np.concatenate([model_input, state.extra_channels], axis=1)
                feeds = self.denoiser_feeds(state.feeds, model_input, t)
            if state.controlnet is not None:
                with self._stage(timings, "controlnet"):
                    feeds.update(state.controlnet(i, t, control_input, feeds))
            with self._stage(timings, "unet"):
                if deep_cache is None:
                    noise_pred = self.run_denoiser(feeds, release_memory=self.last_step(i))
                else:
                    noise_pred = deep_cache.run(self, i, feeds)
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
        return self.vae.decode(self.unscale_latents(latents)).sample

    def encode_image(self, image: np.ndarray, generator: Any, sample: bool = True) -> np.ndarray:
        """VAE-encode a [-1, 1] NCHW batch and draw from the latent distribution (Diffusers' `retrieve_latents`)."""
        if self.vae.kind == "tiny":  # the tiny encoder gives the latents themselves: nothing to sample
            return self.vae.encode(image).latents
        if isinstance(generator, list):
            rows = [self.encode_image(image[i : i + 1], generator[i], sample) for i in range(image.shape[0])]
            return np.concatenate(rows, axis=0)
        dist = self.vae.encode(image).latent_dist
        return dist.sample(generator) if sample else dist.mode()


def pipe_as(target: type[DiffusionPipeline], pipeline: DiffusionPipeline,
            overrides: dict[str, Any]) -> DiffusionPipeline:
    """`target` on `pipeline`'s package, provider, scheduler, VAE choice and (shared, thread-safe) engines."""
    options = {"provider": pipeline.provider, "scheduler": pipeline.scheduler, "vae": pipeline.vae.kind,
               "release_memory": pipeline.release_memory, "component_options": pipeline.component_options,
               "deep_cache_schedule": pipeline.deep_cache_schedule,
               **pipeline.engine_options}
    options.update(overrides)
    new = target(pipeline.package, **options)
    new._engines = pipeline._engines
    new._engine_signatures = pipeline._engine_signatures
    new.adapters = pipeline.adapters
    new._progress_bar_config = dict(pipeline._progress_bar_config)
    return new


def warmup_call_arguments(pipe: DiffusionPipeline, height: int | None, width: int | None, batch_size: int,
                          arguments: dict[str, Any]) -> None:
    """The arguments of `warmup`'s one short call, filled into `arguments`."""
    from diffrt.runtime.pipelines.checks import check_positive_int

    check_positive_int("batch_size", batch_size)
    height, width = height or pipe.default_size(), width or pipe.default_size()
    parameters = inspect.signature(pipe.__call__).parameters
    # "np" output: the decoder prepares its shape too
    # two steps with DeepCache: the full and the shallow UNet both prepare the shape
    steps = 2 if arguments.get("deep_cache_interval") not in (None, 1) else 1
    defaults = {"prompt": [""] * batch_size, "num_inference_steps": steps, "output_type": "np"}
    gray = np.full((1, height, width, 3), 0.5, np.float32)
    if "image" in parameters:
        defaults["image"] = gray
    if "strength" in parameters:
        defaults["strength"] = 1.0
    if "control_image" in parameters:  # ControlNet image-to-image and inpainting
        defaults["control_image"] = gray
    if "mask_image" in parameters:
        defaults["mask_image"] = np.ones((1, height, width), np.float32)
    if "height" in parameters:
        defaults.update(height=height, width=width)
    for name, value in defaults.items():
        arguments.setdefault(name, value)


def require_component(pipeline: DiffusionPipeline, name: str, reason: str) -> None:
    if not pipeline.has_component(name):
        raise PackageError(f"this package has no `{name}` component, needed for {reason}")
