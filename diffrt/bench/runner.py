"""`diffrt bench` orchestration: resolve the package, start one worker process per side, interleave their runs.

Each side (diffrt, and each `--compare` library) runs in its own process (`diffrt.bench.worker`), so the diffrt
side stays torch-free and no side shares an allocator or thread pool with another. Sides load one after the other
(their cold starts are not disturbed by each other); measured runs are then interleaved A B, B A, A B, ... so
machine drift falls on both sides alike. `--one-at-a-time` runs all of one side's images and closes it before the
next side loads: for models whose two copies do not fit in memory at once (drift then falls between the sides).
The first image of each side is its cold start and counts as its first warm-up run; with `--warmup 0` it is the
first measured run instead.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from diffrt.bench.presets import (
    PRESETS,
    cache_root,
    ensure_controlnet_package,
    ensure_package,
    ensure_tiny_vae,
    is_preset,
    load_preset,
)
from diffrt.bench.side import CPU_PROVIDERS, RunConfig
from diffrt.errors import EngineError, InputError, PackageError, invalid
from diffrt.package.names import CONFIG_NAME, CONTROLNET_PREFIX, INDEX_NAME
from diffrt.package.reader import ModelPackage
from diffrt.runtime.engines import PRECISION_PROVIDERS, split_engine_options

__all__ = ["BenchOptions", "Variant", "run_benchmark", "variants", "COMPARE_SIDES"]

logger = logging.getLogger(__name__)

COMPARE_SIDES = ("diffusers", "optimum")
#: the denoiser is either of DENOISERS (UNet pipelines; SD3 / FLUX transformer pipelines)
NEEDED = ("vae_decoder",)
DENOISERS = ("unet", "transformer")
VAES = ("full", "tiny")
#: ONNX Runtime CUDA, and its engine flags (`cuda:graph+nhwc`) -> engine options
CUDA_PROVIDERS = ("cuda", "cudaexecutionprovider")
CUDA_FLAGS = {"graph": "cuda_graph", "nhwc": "prefer_nhwc"}
#: package targets of presets: onnxruntime (every provider), cuda (ONNX Runtime CUDA only), tensorrt (provider trt)
TARGETS = ("onnxruntime", "cuda", "tensorrt")
#: the most ControlNets `--controlnet N` builds into a preset (each is about a third of the UNet)
MAX_CONTROLNETS = 4


@dataclass(frozen=True)
class BenchOptions:
    """`provider` and `vae` are comma-separated lists: each provider x vae pair is one diffrt side."""

    target: str
    provider: str = "cpu"
    vae: str = "full"
    steps: int = 20
    height: int | None = None
    width: int | None = None
    batch: int = 1
    guidance: float = 7.5
    scheduler: str | None = None
    warmup: int = 1
    runs: int = 3
    compare: tuple[str, ...] = ()
    threads: int | None = None
    seed: int = 0
    checkpoint: str | None = None
    #: the preset package's export target (None: tensorrt for provider trt, else onnxruntime)
    export_target: str | None = None
    #: ControlNets run with the UNet (0: text-to-image alone; 1: single; 2+: multi-ControlNet)
    controlnets: int = 0
    #: run each side's images, then close it, before the next side starts (models too large for two at once);
    #: default: sides stay loaded and their runs interleave
    one_at_a_time: bool = False
    #: `--engine-option [COMPONENT:]KEY=VALUE` values, (component or None, key, value), for every diffrt side
    engine_options: tuple[tuple[str | None, str, Any], ...] = ()
    #: DeepCache intervals, each a diffrt side per provider and VAE (1: off); empty: no DeepCache side
    deep_cache: tuple[int, ...] = ()


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(name, f"an integer >= {minimum}", value)


def check_options(opts: BenchOptions) -> None:
    """Every argument checked before anything is built or loaded."""
    if not is_preset(opts.target) and not Path(opts.target).is_dir():
        raise invalid("package", f"a model package folder or a preset ({', '.join(PRESETS)})", opts.target)
    for name in ("steps", "batch", "runs", "warmup", "threads"):
        value = getattr(opts, name)
        if value is not None:
            _positive_int(name, value, 0 if name == "warmup" else 1)
    if isinstance(opts.controlnets, bool) or not isinstance(opts.controlnets, int) or \
            not 0 <= opts.controlnets <= MAX_CONTROLNETS:
        raise invalid("controlnet", f"a number of ControlNets from 0 to {MAX_CONTROLNETS}", opts.controlnets)
    for interval in opts.deep_cache:
        _positive_int("deep_cache", interval)
    if opts.controlnets and uses_deep_cache(opts):
        raise invalid("deep_cache", "1 (off) with --controlnet (DeepCache does not combine with ControlNets)",
                      ",".join(map(str, opts.deep_cache)))
    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
            raise invalid(name, "a multiple of 8, at least 8", value)
    if not 0.0 <= opts.guidance <= 100.0:
        raise invalid("guidance", "a number in [0, 100]", opts.guidance)
    unknown = [side for side in opts.compare if side not in COMPARE_SIDES]
    if unknown:
        raise invalid("compare", f"a comma-separated list of {', '.join(COMPARE_SIDES)}", unknown[0])
    if opts.scheduler is not None:
        from diffrt.schedulers import registered_names

        if opts.scheduler not in registered_names():
            raise invalid("scheduler", f"a Diffusers scheduler class name ({', '.join(registered_names())})",
                          opts.scheduler)
    for variant in variants(opts):
        check_variant(variant)
    if is_preset(opts.target) and load_preset(opts.target).denoiser == "transformer":
        check_transformer_options(opts, f"preset {opts.target}")
    if opts.export_target is not None:
        if opts.export_target not in TARGETS:
            raise invalid("target", f"one of {', '.join(TARGETS)}", opts.export_target)
        if opts.export_target == "cuda" and not all(v.is_cuda for v in variants(opts)):
            raise invalid("provider", "cuda sides only with --target cuda (its fused kernels run on CUDA alone)",
                          opts.provider)


def check_transformer_options(opts: BenchOptions, what: str) -> None:
    """What the SD3 / FLUX pipelines do not run: ControlNets (the bench's are UNet ControlNets) and the tiny VAE
    (TAESD has 4 latent channels, these models 16)."""
    if opts.controlnets:
        raise invalid("controlnet", f"0 for {what} (a transformer pipeline; the benchmark's ControlNets are UNet "
                      "ControlNets)", opts.controlnets)
    if any(variant.vae == "tiny" for variant in variants(opts)):
        raise invalid("vae", f"full for {what} (the tiny VAE, TAESD, decodes 4-channel latents; this model's "
                      "have 16)", opts.vae)
    if uses_deep_cache(opts):
        raise invalid("deep_cache", f"1 (off) for {what} (DeepCache caches UNet features)",
                      ",".join(map(str, opts.deep_cache)))


def uses_deep_cache(opts: BenchOptions) -> bool:
    return any(interval > 1 for interval in opts.deep_cache)


@dataclass(frozen=True)
class Variant:
    """One diffrt side: a provider (with an inference precision, or CUDA engine flags) and a VAE choice."""

    provider: str
    precision: str | None = None
    vae: str = "full"
    #: CUDA engine flags (`cuda:graph+nhwc`): graph = cuda_graph=True, nhwc = prefer_nhwc=True
    flags: tuple[str, ...] = ()
    #: DeepCache's interval (None: off)
    deep_cache: int | None = None

    @property
    def label(self) -> str:
        name = self.provider + (f":{self.precision}" if self.precision else "")
        name += f":{'+'.join(self.flags)}" if self.flags else ""
        name += f"+deep-cache-{self.deep_cache}" if self.deep_cache else ""
        return name + ("+tiny-vae" if self.vae == "tiny" else "")

    @property
    def is_cuda(self) -> bool:
        return self.provider.lower() in CUDA_PROVIDERS


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def variants(opts: BenchOptions) -> list[Variant]:
    """The diffrt sides, in the order given: `--provider cpu,openvino:bf16 --vae full,tiny` gives four."""
    providers, vaes = _split(opts.provider), _split(opts.vae)
    if not providers:
        raise invalid("provider", "a comma-separated list of providers (cpu, openvino[:fp32|bf16|int8|auto], ...)",
                      opts.provider)
    if not vaes or any(vae not in VAES for vae in vaes):
        raise invalid("vae", f"a comma-separated list of {', '.join(VAES)}", opts.vae)
    out = []
    intervals = [interval if interval > 1 else None for interval in opts.deep_cache] or [None]
    for spec in providers:
        provider, _, suffix = spec.partition(":")
        if provider.lower() in CUDA_PROVIDERS:
            flags = tuple(flag for flag in suffix.split("+") if flag)
            out += [Variant(provider, None, vae, flags, n) for vae in vaes for n in intervals]
        else:
            out += [Variant(provider, suffix or None, vae, (), n) for vae in vaes for n in intervals]
    if len(set(out)) != len(out):
        raise invalid("provider", "a list without repeats", opts.provider)
    return out


def check_variant(variant: Variant) -> None:
    """The provider can run here and its precision is one this CPU runs natively (before anything is loaded)."""
    from diffrt.runtime.pipelines.base import check_provider

    unknown = [flag for flag in variant.flags if flag not in CUDA_FLAGS]
    if unknown:
        raise invalid("provider", f"CUDA flags from {', '.join(CUDA_FLAGS)} joined by '+' (cuda:graph+nhwc)",
                      variant.label)
    check_provider(variant.provider)
    if variant.precision is None:
        return
    if variant.provider.lower() not in PRECISION_PROVIDERS:
        raise invalid("provider", f"a precision suffix only on {', '.join(PRECISION_PROVIDERS)} "
                      "(ONNX Runtime runs the package's own precision)", f"{variant.provider}:{variant.precision}")
    from diffrt.runtime.engines.openvino import resolve_precision

    try:
        resolve_precision(variant.precision)
    except ValueError as error:
        raise InputError(f"`provider` {variant.label}: {error}") from error


def side_names(opts: BenchOptions) -> list[str]:
    """`diffrt` for a single diffrt side, else `diffrt[<variant>]` each."""
    found = variants(opts)
    return ["diffrt"] if len(found) == 1 else [f"diffrt[{variant.label}]" for variant in found]


def _source_checkpoint(package: ModelPackage) -> str | None:
    """The local checkpoint folder the package was exported from, if the manifest names one that still exists."""
    source = (package.manifest or {}).get("source") or {}
    for key in ("path", "id"):
        value = source.get(key) if isinstance(source, dict) else None
        if isinstance(value, str) and (Path(value) / INDEX_NAME).exists():
            return value
    return None


def resolve(opts: BenchOptions) -> tuple[Path, str | None, int]:
    """(package folder, source checkpoint or None, default image size); builds a preset on first use."""
    if is_preset(opts.target):
        preset = load_preset(opts.target)
        providers = {variant.provider.lower() for variant in variants(opts)}
        if "trt" in providers and len(providers) > 1:
            raise invalid("provider", "'trt' alone (its package is exported for TensorRT)", opts.provider)
        on_cpu = providers <= set(CPU_PROVIDERS)
        target = opts.export_target or ("tensorrt" if providers == {"trt"} else "onnxruntime")
        precision = "fp32" if on_cpu else "fp16"
        beside = bool(opts.compare) and on_cpu and not opts.one_at_a_time
        package = (ensure_controlnet_package(opts.target, opts.controlnets, precision, target, beside=beside)
                   if opts.controlnets else ensure_package(opts.target, precision=precision, target=target,
                                                           beside=beside, deep_cache=uses_deep_cache(opts)))
        if any(variant.vae == "tiny" for variant in variants(opts)):
            ensure_tiny_vae(opts.target, package)
        size = preset.default_size
        if target == "tensorrt":  # static engines for exactly the benchmarked shape: TensorRT's fastest case
            from diffrt.export.tensorrt import build_engines

            build_engines(package, static=(opts.batch, opts.height or size, opts.width or size),
                          cfg=opts.guidance > 1.0)
        return package, opts.checkpoint or str(preset.checkpoint), size
    package = Path(opts.target)
    try:
        opened = ModelPackage.open(package)
    except Exception as error:
        raise PackageError(f"`package` {str(package)!r} is not a model package: {error}") from error
    needed = NEEDED + (("vae_decoder_tiny",) if any(v.vae == "tiny" for v in variants(opts)) else ())
    missing = [name for name in needed if not opened.has(name)]
    if not any(opened.has(name) for name in DENOISERS):
        missing.insert(0, "unet")
    if not (opened.has("text_encoder") or opened.has("text_encoder_2")):
        missing.append("text_encoder")
    if missing:
        raise PackageError(f"`package` {str(package)!r} has no {', '.join(missing)} component, needed to benchmark "
                           "text-to-image; export it with those components")
    if uses_deep_cache(opts) and opened.deep_cache_branch is None:
        raise PackageError(f"`package` {str(package)!r} was exported without DeepCache, which --deep-cache needs: "
                           "export it with `diffrt export SOURCE OUTPUT --deep-cache`")
    if opened.has("transformer"):
        check_transformer_options(opts, f"package {str(package)!r}")
        from diffrt.runtime.pipelines.flow_base import FLUX_SAMPLE_SIZE

        sample = opened.component("transformer").config.get("sample_size") or FLUX_SAMPLE_SIZE
    else:
        controlnet_components(opened, opts.controlnets)
        sample = opened.unet_config.get("sample_size", 64)
    size = (sample[0] if isinstance(sample, (list, tuple)) else sample) * 8
    return package, opts.checkpoint or _source_checkpoint(opened), int(size)


def controlnet_components(package: ModelPackage, count: int) -> list[tuple[str, str]]:
    """(name, source folder or "") of the package's first `count` ControlNets: diffrt runs them by name, Diffusers
    loads them from the folder the manifest records (a preset's, or a local export's)."""
    if count == 0:
        return []
    components = (package.manifest or {}).get("components", {})
    found = [name for name in components if name.startswith(CONTROLNET_PREFIX)]
    if len(found) < count:
        listed = ", ".join(found) or "none"
        raise PackageError(f"`package` {str(package.root)!r} has {len(found)} ControlNet(s) ({listed}); "
                           f"--controlnet {count} needs {count}: add them with `diffrt export --controlnet CN "
                           f"--into {package.root}`")
    out = []
    for name in found[:count]:
        source = (components[name].get("source") or {}).get("id")
        folder = source if isinstance(source, str) and (Path(source) / CONFIG_NAME).is_file() else ""
        out.append((name[len(CONTROLNET_PREFIX):], folder))
    return out


class Worker:
    """One side's process; `request()` runs one image there and returns its sample."""

    def __init__(self, kind: str, config: RunConfig, side: str | None = None):
        self.side = side or kind
        env = dict(os.environ, OMP_NUM_THREADS=str(config.threads), TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-m", "diffrt.bench.worker", kind, config.to_json()]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise EngineError(f"the {self.side} benchmark process exited with status {code} (see its log above)")
        message = json.loads(line)
        if message.get("event") == "error":
            self.close()
            cls = InputError if message["type"] in ("InputError", "PackageError", "ConfigError") else EngineError
            raise cls(f"{self.side} side: {message['message']}")
        return message

    def request(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": "run"}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
            except OSError:
                pass
        self.process.wait()


def run_config(opts: BenchOptions, package: Path, checkpoint: str | None, size: int) -> RunConfig:
    """The shared configuration; the first diffrt variant's provider decides CPU vs GPU for the compared sides."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = opts.threads or available
    first = variants(opts)[0]
    control = controlnet_components(ModelPackage.open(package), opts.controlnets) if opts.controlnets else []
    # A real-size preset turns the engines' optimised-model cache off: it would write a second copy of its weights.
    cached = not is_preset(opts.target) or load_preset(opts.target).spec.get("engine_cache", True)
    return RunConfig(package=str(package), checkpoint=checkpoint, provider=first.provider, steps=opts.steps,
                     height=opts.height or size, width=opts.width or size, batch=opts.batch,
                     guidance=opts.guidance, scheduler=opts.scheduler, threads=int(threads or 1), seed=opts.seed,
                     cache_dir=str(cache_root() / "optimized") if cached else None,
                     controlnets=tuple(name for name, _ in control),
                     controlnet_sources=tuple(source for _, source in control))


def side_configs(opts: BenchOptions, config: RunConfig, image_dir: str) -> dict[str, tuple[str, RunConfig]]:
    """side name -> (worker kind, its RunConfig): the diffrt variants first, then the compared libraries."""
    out = {}
    common, per_component = split_engine_options(opts.engine_options)
    for name, variant in zip(side_names(opts), variants(opts)):
        out[name] = ("diffrt", replace(config, provider=variant.provider, precision=variant.precision,
                                       engine_options=common, component_options=per_component,
                                       vae=variant.vae, side=name, image_dir=image_dir,
                                       engine_flags=tuple(CUDA_FLAGS[flag] for flag in variant.flags),
                                       deep_cache_interval=variant.deep_cache))
    for name in opts.compare:
        out[name] = (name, replace(config, side=name, image_dir=image_dir))
    return out


def run_benchmark(opts: BenchOptions, journal: str | Path | None = None) -> dict[str, Any]:
    """Run the benchmark and return its full record (see `diffrt.bench.report.build_record`).

    `journal`: a file that gets one JSON line per sample as it arrives, so an interrupted long benchmark (an SD
    image takes minutes on a small CPU) keeps what it measured.
    """
    from diffrt.bench.report import build_record, image_quality

    check_options(opts)
    package, checkpoint, size = resolve(opts)
    config = run_config(opts, package, checkpoint, size)
    with tempfile.TemporaryDirectory(prefix="diffrt-bench-") as image_dir:
        configs = side_configs(opts, config, image_dir)
        raw = _run_sides(opts, configs, Journal(journal))
        quality = image_quality(Path(image_dir), list(configs))
    return build_record(opts, config, raw, load_preset(opts.target).name if is_preset(opts.target) else None,
                        sides_config={name: asdict(cfg) for name, (_, cfg) in configs.items()}, quality=quality)


class Journal:
    """Appends `{"side", "kind", ...}` JSON lines to a file (nothing when the path is None)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, side: str, kind: str, data: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"side": side, "kind": kind, **data}) + "\n")


def _run_sides(opts: BenchOptions, configs: dict[str, tuple[str, RunConfig]], journal: Journal) -> dict[str, Any]:
    """Each side's samples; a side that fails (its engine cannot load here, a run errors) is recorded with its
    error and left out of the remaining rounds, so one broken side does not cost the others' measurements.
    `opts.one_at_a_time`: each side loads, runs every round and exits before the next side loads."""
    sides = tuple(configs)
    raw: dict[str, Any] = {side: {"warmup": [], "samples": []} for side in sides}
    workers: dict[str, Worker] = {}
    warmup, runs = max(opts.warmup - 1, 0), opts.runs - (0 if opts.warmup else 1)
    try:
        for side, (kind, side_config) in configs.items():
            _start(opts, raw, workers, journal, side, kind, side_config)
            if opts.one_at_a_time and side in workers:
                _interleave({side: workers[side]}, raw, warmup, runs, journal)
                if side in workers:  # still running (a failed side was closed already)
                    workers.pop(side).close()
        if not opts.one_at_a_time:
            _interleave(workers, raw, warmup, runs, journal)
    finally:
        for worker in workers.values():
            worker.close()
    failed = [side for side in sides if "error" in raw[side]]
    if len(failed) == len(sides) or any(not raw[side]["samples"] for side in sides if side not in failed):
        raise EngineError("; ".join(f"{side}: {raw[side].get('error', 'no measured run')}" for side in sides))
    return raw


def _start(opts: BenchOptions, raw: dict[str, Any], workers: dict[str, Worker], journal: Journal, side: str,
           kind: str, config: RunConfig) -> None:
    """Start `side`'s worker and record its cold start and first image (a failure is recorded, not raised)."""
    logger.info("%s: loading and making the first image (cold start)", side)
    try:
        workers[side] = Worker(kind, config, side)
        ready = workers[side].read()
    except (EngineError, InputError) as error:
        _fail(raw, workers, journal, side, error)
        return
    raw[side].update(info=ready["info"], cold_start=ready["cold_start"])
    first = dict(ready["first"], round=0, finished=time.time())
    raw[side]["warmup" if opts.warmup else "samples"].append(first)
    journal.write(side, "ready", {"info": ready["info"], "cold_start": ready["cold_start"], "first": first})


def _fail(raw: dict[str, Any], workers: dict[str, Worker], journal: Journal, side: str, error: Exception) -> None:
    logger.error("%s failed and is left out of the benchmark: %s", side, error)
    raw[side]["error"] = str(error)
    journal.write(side, "error", {"error": str(error)})
    worker = workers.pop(side, None)
    if worker is not None:
        worker.close()


def _interleave(workers: dict[str, Worker], raw: dict[str, Any], warmup: int, runs: int, journal: Journal) -> None:
    sides = list(workers)
    for round_ in range(1, warmup + runs + 1):
        order = sides if round_ % 2 else list(reversed(sides))
        for side in order:
            if side not in workers:
                continue
            start = time.perf_counter()
            try:
                sample = dict(workers[side].request(), round=round_, finished=time.time())
            except (EngineError, InputError) as error:
                _fail(raw, workers, journal, side, error)
                continue
            sample.pop("event", None)
            raw[side]["warmup" if round_ <= warmup else "samples"].append(sample)
            journal.write(side, "warmup" if round_ <= warmup else "sample", sample)
            logger.info("%s: %s %d done in %.2f s", side, "warm-up" if round_ <= warmup else "run",
                        round_ if round_ <= warmup else round_ - warmup, time.perf_counter() - start)
