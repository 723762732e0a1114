"""ONNX -> TensorRT engines for a model package (`diffrt build-engines`, `diffrt export ... --tensorrt`).

`build_engines` checks every argument and computes every profile (`tensorrt_profiles`) before TensorRT is imported,
then builds one plan per component with TensorRT's Python API and writes it with its build record
(`diffrt.package.tensorrt_records`) into `<component>/engines/`. An engine whose record already exists is kept
(`rebuild` builds it again).

Precision. An ONNX exported in fp16 / bf16 already says which ops run in reduced precision and which stay float32
(the islands of `diffrt.export.precision`), so it is built as a strongly typed network: TensorRT keeps those types
instead of choosing its own. A float32 component of such a package is an island on purpose (the SDXL VAE with
`force_upcast`) and stays float32 (TF32 allowed, as PyTorch's convolutions do by default). An fp32 package gets
builder flags instead: FP16 / BF16 let TensorRT pick per layer; fp32 also turns TF32 off, for exact float32.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from diffrt.errors import ConfigError, ExportError, PackageError, invalid
from diffrt.export.tensorrt_profiles import SizeRange, component_profiles, size_requests
from diffrt.package.files import files_sha256, write_bytes
from diffrt.package.names import ENGINES_FOLDER
from diffrt.package.reader import ComponentInfo, ModelPackage
from diffrt.package.tensorrt_records import (
    Platform,
    Profile,
    build_info,
    engine_record,
    existing,
    onnx_files,
    record_key,
    write_engine,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("fp16", "bf16", "fp32")
REDUCED = ("fp16", "bf16")
OPT_LEVELS = (0, 5)  # IBuilderConfig.builder_optimization_level; TensorRT's default is 3
DEFAULT_SAMPLE_SIZE = 64
DEFAULT_VAE_FACTOR = 8


@dataclass(frozen=True)
class ComponentBuild:
    """What one engine is built from: the component, its engine precision, typing and profiles."""

    component: ComponentInfo
    precision: str
    strongly_typed: bool
    tf32: bool
    profiles: list[Profile]


@dataclass(frozen=True)
class BuildOptions:
    opt_level: int = 3
    timing_cache: Path | None = None
    refit: bool = False
    version_compatible: bool = False
    hardware_compatible: bool = False
    rebuild: bool = False
    device_id: int = 0

    @property
    def flags(self) -> dict[str, bool]:
        return {"refit": self.refit, "version_compatible": self.version_compatible,
                "hardware_compatible": self.hardware_compatible}


def check_build_options(opt_level: Any = 3, timing_cache: Any = None, refit: Any = False,
                        version_compatible: Any = False, hardware_compatible: Any = False, rebuild: Any = False,
                        device_id: Any = 0) -> BuildOptions:
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not OPT_LEVELS[0] <= opt_level <= OPT_LEVELS[1]:
        raise invalid("opt_level", f"an int in [{OPT_LEVELS[0]}, {OPT_LEVELS[1]}]", opt_level)
    flags = {"refit": refit, "version_compatible": version_compatible, "hardware_compatible": hardware_compatible,
             "rebuild": rebuild}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise invalid(name, "True or False", value)
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise invalid("device_id", "an int >= 0 (a CUDA device index)", device_id)
    cache = Path(timing_cache) if timing_cache is not None else None
    if cache is not None and cache.is_dir():
        raise invalid("timing_cache", "a file path (created when absent)", str(cache))
    return BuildOptions(opt_level, cache, refit, version_compatible, hardware_compatible, rebuild, device_id)


def engine_precision(component: ComponentInfo, requested: str, package_precision: str) -> tuple[str, bool, bool]:
    """(engine precision, strongly typed, TF32 allowed) for `component` (see the module docstring)."""
    exported = str((component.manifest or {}).get("precision", "fp32"))
    if exported in REDUCED:
        if requested != exported:
            raise invalid("precision", f"{exported!r} for `{component.name}` (its ONNX is {exported}, built as a "
                          f"strongly typed network; export with --precision fp32 to choose the engine precision)",
                          requested)
        return exported, True, True
    if package_precision in REDUCED:
        return "fp32", True, True  # an island export kept in float32 on purpose
    return requested, False, requested != "fp32"


def _default_precision(package: ModelPackage) -> str:
    exported = str((package.manifest or {}).get("precision", "fp32"))
    return exported if exported in REDUCED else "fp16"


def _vae_factor_and_size(package: ModelPackage) -> tuple[int, int]:
    """The VAE's downscale factor and the UNet's native image size in pixels (defaults without configs)."""
    try:
        factor = 2 ** (len(package.vae_config.get("block_out_channels", [0] * 4)) - 1)
    except PackageError:  # a package without a VAE config (e.g. text encoders only)
        factor = DEFAULT_VAE_FACTOR
    try:
        sample = package.unet_config.get("sample_size", DEFAULT_SAMPLE_SIZE)
    except PackageError:
        sample = DEFAULT_SAMPLE_SIZE
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return factor, int(sample) * factor


def _choose_components(package: ModelPackage, components: Sequence[str] | None, label: str) -> list[ComponentInfo]:
    have = list(package.components)
    if components is None:
        return [package.components[name] for name in have]
    if isinstance(components, str) or not components or not all(isinstance(c, str) for c in components):
        raise invalid(label, f"None or a non-empty list of names from {', '.join(have)}", components)
    missing = [name for name in components if name not in package.components]
    if missing:
        raise invalid(label, f"names from this package's components ({', '.join(have)})", missing[0])
    return [package.components[name] for name in dict.fromkeys(components)]


def _check_target(package: ModelPackage) -> None:
    target = (package.manifest or {}).get("target")
    if target != "tensorrt":
        raise invalid("package", "a package exported with `--target tensorrt` (opset 18, attention as "
                      "MatMul-Softmax-MatMul, which every TensorRT 10 parser reads and fuses)",
                      f"{package.root} with target {target}", ConfigError)


def plan_builds(package: ModelPackage, *, components: Sequence[str] | None = None, precision: str | None = None,
                static: Any = None, min_size: Any = None, opt_size: Any = None, max_size: Any = None,
                batch: Any = None, buckets: Sequence[Any] | None = None, cfg: bool | None = None,
                prompt_chunks: int = 1, names: Mapping[str, str] | None = None) -> list[ComponentBuild]:
    """Every engine to build, with its profiles; all argument errors are raised here (no TensorRT needed).

    Planning reads only the manifest, so it works on any diffrt package; `build_engines` then requires the
    `--target tensorrt` export."""
    if precision is not None and precision not in PRECISIONS:
        raise invalid("precision", f"None (the package's) or one of {', '.join(PRECISIONS)}", precision)
    if cfg is not None and not isinstance(cfg, bool):
        raise invalid("cfg", "None (auto), True or False", cfg)
    label = dict(names or {})
    if isinstance(prompt_chunks, bool) or not isinstance(prompt_chunks, int) or prompt_chunks < 1:
        raise invalid(label.get("prompt_chunks", "prompt_chunks"), "an int >= 1 (77-token chunks)", prompt_chunks)
    chosen = _choose_components(package, components, label.get("components", "components"))
    factor, default_size = _vae_factor_and_size(package)
    requests: list[SizeRange] = size_requests(static=static, min_size=min_size, opt_size=opt_size,
                                              max_size=max_size, batch=batch, buckets=buckets,
                                              default_size=default_size, vae_scale_factor=factor, names=names)
    if cfg is None:  # LCM-style UNets take the guidance as `timestep_cond` and run without CFG batches
        unet = package.components.get("unet")
        cfg = not (unet is not None and any(s.name == "timestep_cond" for s in unet.inputs or []))
    requested = precision or _default_precision(package)
    package_precision = str((package.manifest or {}).get("precision", "fp32"))
    builds = []
    for component in chosen:
        engine, typed, tf32 = engine_precision(component, requested, package_precision)
        profiles = component_profiles(component, requests, vae_scale_factor=factor, cfg=cfg,
                                      prompt_chunks=prompt_chunks, names=names)
        builds.append(ComponentBuild(component, engine, typed, tf32, profiles))
    return builds


def build_engines(package: str | Path | ModelPackage, *, components: Sequence[str] | None = None,
                  precision: str | None = None, static: Any = None, min_size: Any = None, opt_size: Any = None,
                  max_size: Any = None, batch: Any = None, buckets: Sequence[Any] | None = None,
                  cfg: bool | None = None, prompt_chunks: int = 1, opt_level: int = 3,
                  timing_cache: str | Path | None = None, refit: bool = False, version_compatible: bool = False,
                  hardware_compatible: bool = False, rebuild: bool = False, device_id: int = 0,
                  names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Build (or keep) a TensorRT engine per component of a `--target tensorrt` package; returns their records.

    Sizes (pixels; see `tensorrt_profiles.size_requests`): `static=(batch, height, width)`, or `min_size` /
    `opt_size` / `max_size` (int or (height, width)) with `batch` (int or (min, opt, max) images per call), and/or
    `buckets` [(height, width), ...], one profile each. `cfg` (default: unless the UNet takes `timestep_cond`)
    doubles the UNet batch; `prompt_chunks` long-prompt 77-token chunks. `precision` None: the package's (fp16 for
    an fp32 package). `opt_level` 0-5; `timing_cache` a file reused and updated across builds; `refit`,
    `version_compatible`, `hardware_compatible` (Ampere and newer) set the matching TensorRT options. `names`
    renames arguments in error messages (the CLI passes its option names).
    """
    options = check_build_options(opt_level, timing_cache, refit, version_compatible, hardware_compatible, rebuild,
                                  device_id)
    package = package if isinstance(package, ModelPackage) else ModelPackage.open(package)
    builds = plan_builds(package, components=components, precision=precision, static=static, min_size=min_size,
                         opt_size=opt_size, max_size=max_size, batch=batch, buckets=buckets, cfg=cfg,
                         prompt_chunks=prompt_chunks, names=names)
    _check_target(package)
    from diffrt.runtime.engines import cuda
    from diffrt.runtime.engines.tensorrt import check_trt_provider, import_tensorrt, this_platform

    check_trt_provider(options.device_id)
    cuda.set_device(options.device_id)
    trt = import_tensorrt()
    platform = this_platform(options.device_id)
    extra = cuda.versions()
    return _build_all(trt, builds, options, platform, extra)


def _build_all(trt: Any, builds: list[ComponentBuild], options: BuildOptions, platform: Platform,
               extra: Mapping[str, Any]) -> list[dict[str, Any]]:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from diffrt import __version__

    cache = _TimingCache(options.timing_cache)
    records = []
    with logging_redirect_tqdm(), tqdm(builds, desc="build-engines", unit="engine", disable=None) as bar:
        for build in bar:
            name = build.component.name
            bar.set_postfix_str(name)
            record = engine_record(
                component=name, onnx_sha256=files_sha256(onnx_files(build.component)), precision=build.precision,
                strongly_typed=build.strongly_typed, profiles=build.profiles, opt_level=options.opt_level,
                flags={**options.flags, "tf32": build.tf32}, platform=platform, diffrt_version=__version__,
            )
            key = record_key(record)
            folder = build.component.folder / ENGINES_FOLDER
            stored = existing(folder, key)
            if stored is not None and not options.rebuild:
                logger.info("%s: engine %s is up to date (rebuild=True / --rebuild builds it again)", name, key)
                records.append(stored.data)
                continue
            start = time.perf_counter()
            plan = _build_plan(trt, build, options, cache)
            seconds = time.perf_counter() - start
            size = memoryview(plan).nbytes
            record = {**record, "key": key, "build": build_info(seconds, size, extra)}
            path = write_engine(folder, key, plan, record)
            cache.save()
            logger.info("%s: built %s engine %s (%d profile%s) in %.1f s, %.1f MB -> %s", name, build.precision, key,
                        len(build.profiles), "" if len(build.profiles) == 1 else "s", seconds, size / 2**20, path)
            records.append(record)
    return records


class _TimingCache:
    """The persistent timing cache: loaded once, shared by every build, saved (atomically) after each."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.cache: Any = None

    def attach(self, config: Any) -> None:
        if self.path is None:
            return
        if self.cache is None:
            data = self.path.read_bytes() if self.path.is_file() else b""
            try:
                self.cache = config.create_timing_cache(data)
            except (RuntimeError, TypeError, ValueError):  # TensorRT raises on a corrupt or foreign cache
                self.cache = None
            if self.cache is None and data:
                logger.warning("ignoring the unreadable TensorRT timing cache %s; starting a new one", self.path)
                self.cache = config.create_timing_cache(b"")
            if self.cache is None:
                raise ExportError(f"TensorRT could not create a timing cache for {self.path}")
        if not config.set_timing_cache(self.cache, False):
            raise ExportError(f"TensorRT refused the timing cache {self.path} (built by another TensorRT or GPU?); "
                              f"delete it to start a new one")

    def save(self) -> None:
        if self.path is not None and self.cache is not None:
            write_bytes(self.path, self.cache.serialize())


def _build_plan(trt: Any, build: ComponentBuild, options: BuildOptions, cache: _TimingCache) -> Any:
    """Parse the ONNX file and build the serialized plan (an IHostMemory)."""
    from diffrt.runtime.engines.tensorrt import recent_errors, trt_logger

    builder = trt.Builder(trt_logger())
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if build.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger())
    # From the path, so the parser finds model.onnx_data beside it.
    if not parser.parse_from_file(str(build.component.path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {build.component.path}: {'; '.join(errors) or '?'}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    _set_precision(trt, config, build)
    _set_flags(trt, config, options)
    _add_profiles(builder, network, config, build)
    cache.attach(config)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine for `{build.component.name}` (a null plan): "
                          f"{recent_errors()}")
    return plan


def _parser_error(error: Any) -> str:
    try:
        where = f"node {error.node()} ({error.node_operator()} {error.node_name()!r})" if error.node() >= 0 else ""
        return f"{where}: {error.desc()}" if where else str(error.desc())
    except AttributeError:  # older parsers without node details
        return str(error)


def _set_precision(trt: Any, config: Any, build: ComponentBuild) -> None:
    if not build.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if build.strongly_typed or build.precision == "fp32":
        return
    flag = getattr(trt.BuilderFlag, build.precision.upper(), None)
    if flag is None:  # TensorRT releases that dropped weakly typed networks
        raise ExportError(f"this TensorRT ({trt.__version__}) has no {build.precision.upper()} builder flag; export "
                          f"the package with --precision {build.precision} to build a strongly typed engine")
    config.set_flag(flag)


def _set_flags(trt: Any, config: Any, options: BuildOptions) -> None:
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS


def _add_profiles(builder: Any, network: Any, config: Any, build: ComponentBuild) -> None:
    """One optimization profile per requested size; only the network's dynamic inputs get shapes."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    expected = sorted(build.profiles[0]) if build.profiles else []
    if sorted(inputs) != expected:
        raise ExportError(f"{build.component.path} has inputs {sorted(inputs)} but its manifest lists {expected}")
    for ranges in build.profiles:
        profile = builder.create_optimization_profile()
        for name, shape in inputs.items():
            if any(size < 0 for size in shape):
                low, opt, high = ranges[name]
                profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) < 0:
            raise ExportError(f"TensorRT rejected the profile {ranges} of `{build.component.name}`")
