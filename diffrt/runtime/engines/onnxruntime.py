"""ONNX Runtime engine: one lazily created, thread-safe `InferenceSession` per model file.

On CUDA the session runs through `DeviceIO` (device-resident inputs/outputs, optional CUDA graphs; see
`onnxruntime_cuda`).

Providers are checked up front and again on the created session, so a missing CUDA / TensorRT library is an
`EngineError` naming the provider instead of ONNX Runtime's silent fall back to the CPU. The optimised graph can be
cached on disk (keyed by model file, ORT version, providers, optimisation level and CPU) so a second start skips
graph optimisation.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from diffrt.errors import ConfigError, DiffrtError, EngineError, PackageError, invalid
from diffrt.package.files import files_fingerprint
from diffrt.runtime.engines.base import DimRanges, TensorSpec, adapt_feeds, validate_feeds
from diffrt.runtime.engines.onnxruntime_cuda import (
    CUDA_OPTION_DEFAULTS,
    CUDA_PROVIDER,
    CudaOptions,
    DeviceIO,
    check_cuda_only,
    preload_cuda_libraries,
)
from diffrt.runtime.engines.residency import release_freed_heap, trim
from diffrt.runtime.engines.shared_weights import SharedWeights, shared_weights

logger = logging.getLogger(__name__)

#: run options that return the CPU arena's free chunks to the system at the end of the run
RELEASE_CPU_ARENA = ort.RunOptions()
RELEASE_CPU_ARENA.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
# TensorRT compiles the subgraphs it supports; the nodes it cannot take run on CUDA, as ORT's TensorRT docs advise.
PROVIDER_EXPANSIONS = {"tensorrt": ["tensorrt", "cuda"]}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
#: where a session keeps the buffers it reads in place (see `OnnxRuntimeEngine._new_session`)
_HELD_ATTRIBUTE = "_diffrt_held"
# Providers that compile subgraphs into nodes ORT cannot serialise, so their optimised model cannot be cached.
_UNCACHEABLE = {"TensorrtExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider"}

ProviderArg = str | Sequence[str | tuple[str, Mapping[str, Any]]]


def resolve_providers(provider: ProviderArg) -> list[tuple[str, dict[str, Any]]]:
    """Short names or ORT names (optionally with options) -> [(ORT name, options)], all available here."""
    if isinstance(provider, str):
        items: list[Any] = PROVIDER_EXPANSIONS.get(provider.lower(), [provider])
    elif isinstance(provider, tuple) and len(provider) == 2 and isinstance(provider[1], Mapping):
        items = [provider]  # a single (name, options) pair
    else:
        items = list(provider)
    if not items:
        raise invalid("provider", "a provider name or a non-empty list of providers", provider, ConfigError)
    available = ort.get_available_providers()
    resolved: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        name, options = (item, {}) if isinstance(item, str) else _split_provider(item)
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise EngineError(
                f"`provider` {name!r} ({full}) is not available in this onnxruntime build "
                f"(onnxruntime {ort.__version__}); available: {available}. "
                "Install onnxruntime-gpu for 'cuda' / 'tensorrt'; diffrt never falls back silently."
            )
        resolved.append((full, dict(options)))
    return resolved


def _split_provider(item: Any) -> tuple[str, Mapping[str, Any]]:
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
        return item[0], item[1]
    raise invalid("provider", "a name or a (name, options dict) tuple for each provider", item, ConfigError)


def check_provider(provider: ProviderArg) -> None:
    """Raise `EngineError` naming `provider` if ONNX Runtime here cannot run it."""
    resolve_providers(provider)


def physical_cores() -> int:
    """Physical cores this process may use: CPU affinity, de-duplicated SMT siblings, cgroup CPU quota."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    count = len(cores)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, count)


def _hardware_signature() -> str:
    """The CPU model: ORT's layout optimisations (NCHWc block size) depend on the instruction set."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _spec(node: Any) -> TensorSpec:
    dtype = ORT_DTYPES.get(node.type)
    if dtype is None:
        raise EngineError(f"input/output `{node.name}` has type {node.type}, which diffrt cannot feed from numpy")
    shape = tuple(d if isinstance(d, (int, str)) else None for d in node.shape)
    return TensorSpec(node.name, np.dtype(dtype), shape)


@dataclass(frozen=True)
class _Held:
    """What a session reads through raw pointers: the shared weights of its file, the overrides it was given."""

    weights: SharedWeights | None
    #: the initializers the session took from `weights`
    shared: frozenset[str]
    values: list[ort.OrtValue]


class OnnxRuntimeEngine:
    """An ONNX model run by ONNX Runtime; see the module docstring.

    Args:
        path: the `model.onnx` file (external data beside it).
        provider: "cpu" | "cuda" | "tensorrt" | an ORT provider name | a list of names or (name, options) tuples.
        threads: intra-op threads; default: the physical cores this process may use.
        graph_optimization_level: "disable" | "basic" | "extended" | "all".
        optimized_model_cache: folder for optimised models, reused by later sessions; None disables the cache.
        dim_ranges: inclusive (low, high) per named dynamic dimension, checked before each run.
        session_options: a base `ort.SessionOptions`; the settings above are applied on top of it.
        initializers: {initializer name: array} replacing those of the model file (LoRA, textual inversion); the
            other weights still come from the file. Values are read each time a session is created (a mapping may
            compute them then, as the adapters' `Overrides` does) and not kept beyond what the session reads in
            place. The optimised-model cache is not used for such a session (its folded weights would be the old
            ones).
        disabled_optimizers: names of ONNX Runtime graph transformers to skip (`InferenceSession`'s argument),
            e.g. ("NchwcTransformer",): level "all"'s blocked-layout pass costs most of an SD 1.5 UNet session's
            creation on a CPU (measured 5-15 s of 6-16 s, for a 3-10 % faster step; docs/adapters.md), which
            matters when LoRA switches re-create the session.
        share_weights: CPU sessions of one model file in this process read the weights ONNX Runtime uses as
            stored from one set of read-only memory-mapped buffers (`shared_weights.SharedWeights`, through
            `SessionOptions.add_initializer`) instead of each its own copy; initializer overrides replace only their
            own names. Same outputs bit for bit. What ONNX Runtime derives from a weight stays per session (and is
            not handed out): pre-packed GEMM weights (see `prepack_weights`) and level "all"'s NCHWc convolution
            weights (see `disabled_optimizers`); for an SD 1.5 UNet at the defaults that is nearly all of it, from
            its optimised-model cache the convolutions are shared (docs/benchmarks.md). Not applied on other
            providers (their weights live in device memory) or with a caller's own `session_options`.
        prepack_weights: False sets ONNX Runtime's `session.disable_prepacking`: MatMul / Gemm weights are read in
            place (shared) instead of packed into a per-session copy, for a slower step (docs/benchmarks.md,
            "Sharing weights between sessions"); outputs differ from the packed ones by float rounding (~1e-6).
        memory_arena: False turns ONNX Runtime's CPU arena off (`enable_cpu_mem_arena`): each tensor comes from
            the system allocator and goes back when freed, so a run peaks at what it holds at once, not at the
            arena's power-of-two growth (SD 1.5's VAE decoder at 512x512: 1.44 instead of 1.72 GiB, same output,
            docs/benchmarks.md). The arena pays off for a model run again and again (the UNet's steps), the system
            allocator for one run per image: pipelines turn it off for their text encoders and VAE while they
            release memory (`release_memory=True`).
        memory_pattern: ONNX Runtime's memory pattern (`enable_mem_pattern`): after the first run it plans one block
            for a shape's intermediate tensors. None (default): off on CPU sessions with the arena, on elsewhere.
            On top of the CPU arena the arena keeps both the first run's per-tensor chunks and that block: an SD 1.5
            UNet step at 512x512 peaked at 4.74 GiB with it and 4.01 GiB without, at the same step time. Without the
            arena the block is one allocation per run instead of one per tensor: its VAE decoder took 13.1 s per
            decode with it and 17.6 s without (docs/benchmarks.md).
        trim_mapped_weights: CPU: at the end of a run with `release_memory`, drop the pages of the memory-mapped
            weight files this session reads in place (its optimised-model cache's external data, or the package's,
            mapped by ONNX Runtime or by `share_weights`) from this process's resident set
            (`residency.trim`). They stay in the page cache and fault back in at the next run, from memory: an SD 1.5
            UNet from its optimised-model cache reads 2.2 GiB of it in place, which no longer counts while the VAE
            decodes, for 0-0.8 s more on the next image's first ~9 s step (docs/benchmarks.md). False keeps them
            resident (what `SHARED_WEIGHT_OPTIONS` does: there every pipeline reads one mapped copy at every step).
        **cuda_options: with provider "cuda": device_id, cuda_graph, prefer_nhwc, conv_algo_search, tf32,
            gpu_memory_limit_mb, arena_growth (see `CudaOptions`). CUDA runs keep inputs and outputs in device
            buffers per input shape (`DeviceIO`) and copy only the inputs that changed.
    """

    #: the CUDA options, taken through **cuda_options
    keyword_options = tuple(CUDA_OPTION_DEFAULTS)

    def __init__(
        self,
        path: str | Path,
        provider: ProviderArg = "cpu",
        threads: int | None = None,
        graph_optimization_level: str = "all",
        optimized_model_cache: str | Path | None = None,
        dim_ranges: DimRanges | None = None,
        session_options: ort.SessionOptions | None = None,
        initializers: Mapping[str, np.ndarray] | None = None,
        disabled_optimizers: Sequence[str] = (),
        share_weights: bool = True,
        prepack_weights: bool = True,
        memory_arena: bool = True,
        memory_pattern: bool | None = None,
        trim_mapped_weights: bool = True,
        **cuda_options: Any,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise invalid("path", "an existing ONNX model file", str(self.path), EngineError)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise invalid("threads", "None or an integer >= 1", threads, ConfigError)
        if graph_optimization_level not in OPTIMIZATION_LEVELS:
            raise invalid("graph_optimization_level", f"one of {', '.join(OPTIMIZATION_LEVELS)}",
                          graph_optimization_level, ConfigError)
        self.providers = resolve_providers(provider)
        self.cuda = self._cuda_options(cuda_options)
        self.threads = threads
        self.graph_optimization_level = graph_optimization_level
        self.optimized_model_cache = Path(optimized_model_cache) if optimized_model_cache is not None else None
        self.dim_ranges = dict(dim_ranges or {})
        if isinstance(disabled_optimizers, str) or not all(isinstance(n, str) for n in disabled_optimizers):
            raise invalid("disabled_optimizers", "a list of ONNX Runtime transformer names such as "
                          "['NchwcTransformer']", disabled_optimizers, ConfigError)
        self.disabled_optimizers = list(disabled_optimizers)
        for name, flag in (("share_weights", share_weights), ("prepack_weights", prepack_weights),
                           ("memory_arena", memory_arena), ("trim_mapped_weights", trim_mapped_weights)):
            if not isinstance(flag, bool):
                raise invalid(name, "True or False", flag, ConfigError)
        self.share_weights = share_weights
        self.prepack_weights = prepack_weights
        self.memory_arena = memory_arena
        if memory_pattern is not None and not isinstance(memory_pattern, bool):
            raise invalid("memory_pattern", "None, True or False", memory_pattern, ConfigError)
        self.memory_pattern = memory_pattern
        self.trim_mapped_weights = trim_mapped_weights
        self._base_options = session_options
        # Read when a session is created (`_add_overrides`); the adapters' mapping computes each value when read.
        self._overrides: Mapping[str, np.ndarray] = initializers if initializers is not None else {}
        self._override_names = frozenset(self._overrides)  # `in` on a Mapping may read (compute) the value
        self._external_overrides = self._stored_externally(self._override_names)
        self._lock = threading.Lock()
        self._session: ort.InferenceSession | None = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        #: the file the session was loaded from: `path`, or the cached optimised model
        self.session_path: Path | None = None
        #: the session's model file and its external data files, whose mapped pages `trim_mapped_weights` drops
        self._weight_files: list[Path] = []
        self._device_io: DeviceIO | None = None
        self._graphs = False
        #: whether this engine's session replays CUDA graphs (decided when the session is created)
        self.cuda_graph_active = False

    def _cuda_options(self, given: dict[str, Any]) -> CudaOptions | None:
        """The CUDA options when the first provider is CUDA (merged into its provider options), else None."""
        unknown = [name for name in given if name not in CUDA_OPTION_DEFAULTS]
        if unknown:
            raise TypeError(f"OnnxRuntimeEngine() got an unexpected keyword argument {unknown[0]!r}")
        if self.providers[0][0] != CUDA_PROVIDER:
            check_cuda_only(given, self.providers[0][0])
            return None
        preload_cuda_libraries()
        return CudaOptions(**given)

    # ----- session -----
    @property
    def session(self) -> ort.InferenceSession:
        """The session, created on first use; the lock guards creation only (ORT's `run` is thread-safe)."""
        session = self._session
        if session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._create_session()
                session = self._session
        return session

    def _session_options(self) -> ort.SessionOptions:
        options = self._base_options if self._base_options is not None else ort.SessionOptions()
        if self.threads is not None or options.intra_op_num_threads == 0:
            options.intra_op_num_threads = self.threads or physical_cores()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.graph_optimization_level]
        # A pipeline alternates engines (text encoder, UNet, VAE) with NumPy scheduler work. Spinning workers
        # busy-wait after every run and keep the cores hot, which slows the NumPy step and the next session's own
        # pool on the same cores; without spinning, idle pools sleep and each stage gets the whole CPU.
        for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
            if not _has_config(options, key):
                options.add_session_config_entry(key, "0")
        if not self.prepack_weights:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if not self.memory_arena:
            options.enable_cpu_mem_arena = False
        pattern = self.memory_pattern
        if pattern is None and self._cpu_only() and self._base_options is None:
            pattern = not self.memory_arena
        if pattern is not None:
            options.enable_mem_pattern = pattern
        return options

    def _stored_externally(self, names: frozenset[str]) -> set[str]:
        if not names:
            return set()
        from diffrt.package.weights import locate_initializers

        try:
            return {name for name, where in locate_initializers(self.path, names).items() if where.external}
        except PackageError as error:
            raise EngineError(f"cannot override initializers of {self.path}: {error}") from error

    def _add_overrides(self, options: ort.SessionOptions) -> dict[str, ort.OrtValue]:
        """Initializer overrides: an initializer kept in the external data file is replaced when the graph is
        loaded (`add_external_initializers`), before any optimisation, so every level sees the new weights. One
        kept inside model.onnx can only be replaced after the graph optimisations (`add_initializer`), and level
        "all"'s layout transformer has by then copied Conv weights into reordered ones the override never reaches
        (measured: wrong images), so such a session runs at most at level "extended".

        Returns the values given, which `options` points at: they must live until the session exists (`_held`)."""
        if not self._overrides:
            return {}
        values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._overrides[name]))
                  for name in self._overrides}
        external = [name for name in values if name in self._external_overrides]
        if external:
            options.add_external_initializers(external, [values[name] for name in external])
        inline = [name for name in values if name not in self._external_overrides]
        for name in inline:
            options.add_initializer(name, values[name])
        extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if inline and options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            options.graph_optimization_level = extended
        return values

    def _held(self, overrides: dict[str, ort.OrtValue]) -> list[ort.OrtValue]:
        """The overrides a created session still reads, which must live as long as it: those given through
        `add_initializer` (read in place). ONNX Runtime copies those given through `add_external_initializers` while
        it creates a CPU session (measured: writing to them afterwards changes no output), so they are dropped once
        it exists instead of being held beside the session's copy; on other providers (not measured) they are kept."""
        if not self._cpu_only():
            return list(overrides.values())
        return [value for name, value in overrides.items() if name not in self._external_overrides]

    def _cpu_only(self) -> bool:
        return all(name == "CPUExecutionProvider" for name, _ in self.providers)

    def _create_session(self) -> ort.InferenceSession:
        if self.cuda is None or self.cuda.cuda_graph is False:
            return self._create_session_for(graphs=False)
        try:
            return self._create_session_for(graphs=True)
        except EngineError as error:
            if self.cuda.cuda_graph is True:
                raise EngineError(f"{error} (`cuda_graph=True`: this model cannot be replayed as a CUDA graph; "
                                  "use cuda_graph=False or 'auto')") from error
            logger.warning("%s cannot run as a CUDA graph (%s); running it without", self.path, error)
            return self._create_session_for(graphs=False)

    def _create_session_for(self, graphs: bool) -> ort.InferenceSession:
        self._graphs = graphs
        cached = self._cache_path()
        if cached is not None and cached.is_file():
            session = self._load_cached(cached, self._session_options())
            if session is not None:
                return self._finish(session, cached)
        if cached is not None:
            session = self._optimize_into_cache(cached, self._session_options())
            if session is not None:
                return self._finish(session, self.path)
        return self._finish(self._new_session(self.path, self._session_options()), self.path)

    def _optimize_into_cache(self, cached: Path, options: ort.SessionOptions) -> ort.InferenceSession | None:
        """Build the session from the source model and save its optimised graph as `cached` (None on failure)."""
        # ORT writes the optimised model while building the session; write it beside the final name, then rename,
        # so a concurrent reader never loads a half-written file.
        tmp = cached.with_name(f".{cached.stem}.{uuid.uuid4().hex}.tmp")
        options.optimized_model_filepath = str(tmp)
        if self._has_external_data():  # > 2 GB graphs cannot be saved as one protobuf
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{cached.stem}.{uuid.uuid4().hex}.data"
            )
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Unshared: ORT writes the graph it optimised from the file itself; later sessions load the cache shared.
            session = self._new_session(self.path, options, share=False)
            os.replace(tmp, cached)
        except (OSError, EngineError) as error:
            # A read-only or full cache folder must not stop inference: run uncached (a broken model fails again).
            logger.warning("could not cache the optimised model of %s in %s: %s", self.path, cached.parent, error)
            return None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            options.optimized_model_filepath = ""  # a caller's session_options must not keep writing there
        logger.info("cached the optimised model of %s at %s", self.path, cached)
        return session

    def _load_cached(self, cached: Path, options: ort.SessionOptions) -> ort.InferenceSession | None:
        # The cached graph is already optimised for this ORT, provider and CPU: optimising it again only costs time.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = self._new_session(cached, options)
        except EngineError as error:
            logger.warning("ignoring an unreadable optimised-model cache %s (%s); rebuilding it", cached, error)
            cached.unlink(missing_ok=True)
            return None
        logger.info("loaded the optimised model of %s from the cache %s", self.path, cached)
        return session

    def _session_providers(self) -> list[tuple[str, dict[str, Any]]]:
        """The providers with diffrt's CUDA options under the user's own CUDA provider options."""
        if self.cuda is None:
            return self.providers
        (name, explicit), rest = self.providers[0], self.providers[1:]
        return [(name, {**self.cuda.provider_options(self._graphs), **explicit}), *rest]

    def _new_session(self, path: Path, options: ort.SessionOptions, share: bool = True) -> ort.InferenceSession:
        """A session of `path`, reading the overrides and, when `share`, the process's shared weights of `path`."""
        overrides = self._add_overrides(options)  # alive until the session exists: `options` points at them
        weights = self._weights_to_share(path) if share else None
        shared: dict[str, ort.OrtValue] = {}
        if weights is not None:
            level = options.graph_optimization_level
            shared = weights.for_session(
                prepack=self.prepack_weights,
                reorders_convolutions=level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                and "NchwcTransformer" not in self.disabled_optimizers,
                folds_constants=level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                and "ConstantFolding" not in self.disabled_optimizers,
                skip=self._override_names)  # an override replaces its own initializer only
            for name, value in shared.items():
                options.add_initializer(name, value)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self._session_providers(),
                                           disabled_optimizers=self.disabled_optimizers or None)
        except Exception as error:  # ORT raises its own pybind exception types
            raise EngineError(f"onnxruntime could not load {path}: {error}") from error
        # The session reads these buffers through raw pointers: they must live exactly as long as it does, even when
        # a run in another thread still holds it after `close()`, so the session object itself keeps them.
        setattr(session, _HELD_ATTRIBUTE, _Held(weights, frozenset(shared), self._held(overrides)))
        if overrides:
            # ONNX Runtime packed and freed its copies of the overrides while building the session, and the values
            # it copied from go here: glibc keeps such freed chunks resident (1 GiB per SD 1.5 LoRA variant).
            del overrides
            release_freed_heap()
        return session

    def _weights_to_share(self, path: Path) -> SharedWeights | None:
        """The process's shared weights of `path` when this session may use them (CPU only: on other providers the
        weights are copied to device memory; a caller's own `session_options` may already carry initializers)."""
        if not self.share_weights or self._base_options is not None or not self._cpu_only():
            return None
        try:
            return shared_weights(path)
        except (OSError, EngineError) as error:  # a file our reader cannot map: ORT still reads it on its own
            logger.warning("not sharing the weights of %s between sessions: %s", path, error)
            return None

    @property
    def weights(self) -> SharedWeights | None:
        """The shared weights the current session uses (None: not created yet, or its weights are its own)."""
        held = getattr(self._session, _HELD_ATTRIBUTE, None)
        return None if held is None else held.weights

    def _finish(self, session: ort.InferenceSession, loaded_from: Path) -> ort.InferenceSession:
        active = session.get_providers()
        missing = [name for name, _ in self.providers if name not in active]
        if missing:
            raise EngineError(
                f"`provider` {missing[0]} was requested but onnxruntime created the session for {self.path} with "
                f"{active} (its libraries failed to load; see onnxruntime's log). diffrt never falls back silently."
            )
        self._inputs = [_spec(node) for node in session.get_inputs()]
        self._outputs = [_spec(node) for node in session.get_outputs()]
        self.session_path = loaded_from
        # model.onnx -> model.onnx_data; a cached unet-model-KEY.onnx -> unet-model-KEY.<id>.data
        self._weight_files = [file for file in loaded_from.parent.iterdir()
                              if file.name.startswith(loaded_from.stem + ".") and file.is_file()]
        if self.cuda is not None:
            self._device_io = DeviceIO(session, [spec.name for spec in self._outputs], "cuda", self.cuda.device_id,
                                       graphs=self._graphs)
            self.cuda_graph_active = self._graphs
        return session

    # ----- optimised-model cache -----
    def _external_data(self) -> Path:
        return self.path.with_name(self.path.name + "_data")

    def _has_external_data(self) -> bool:
        return self._external_data().is_file()

    def _cache_path(self) -> Path | None:
        if self.optimized_model_cache is None or self._overrides:
            return None
        uncacheable = [name for name, _ in self.providers if name in _UNCACHEABLE]
        if self.cuda is not None and self.cuda.prefer_nhwc:
            uncacheable.append("CUDA with prefer_nhwc (its layout pass writes internal NHWC operators)")
        if uncacheable:
            logger.debug("no optimised-model cache with %s (it compiles subgraphs)", uncacheable[0])
            return None
        files = [self.path] + ([self._external_data()] if self._has_external_data() else [])
        disabled = [sorted(self.disabled_optimizers)] if self.disabled_optimizers else []
        key = files_fingerprint(files, ort.__version__, self._session_providers(), self.graph_optimization_level,
                                _hardware_signature(), *disabled)
        return self.optimized_model_cache / f"{self.path.parent.name}-{self.path.stem}-{key}.onnx"

    # ----- Engine protocol -----
    @property
    def inputs(self) -> list[TensorSpec]:
        _ = self.session  # creating the session records the specs
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        _ = self.session
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        """Validate `feeds` (names, dtypes, ranks, dims, ranges) and run; outputs by name, as numpy arrays.

        The CPU arena keeps a run's intermediate tensors for the next run (re-touching fresh pages costs ~13% of
        an SD 1.5 UNet step); `release_memory` shrinks it back at the end of this run, and with
        `trim_mapped_weights` drops the mapped weight pages from the resident set (docs/benchmarks.md)."""
        session = self.session
        feeds = adapt_feeds(self._inputs, feeds)
        validate_feeds(self._inputs, feeds, self.dim_ranges)
        names = [spec.name for spec in self._outputs]
        try:
            if self._device_io is not None:
                values = self._device_io.run(feeds)
            else:
                release = release_memory and self.memory_arena  # without the arena, freed tensors go back at once
                values = session.run(names, feeds, RELEASE_CPU_ARENA if release else None)
        except DiffrtError:
            raise
        except Exception as error:
            if self._graphs and self.cuda is not None and self.cuda.cuda_graph == "auto":
                # Some graphs load for capture but fail in it (a kernel that synchronises the stream):
                # `cuda_graph="auto"` runs this model without graphs from now on.
                logger.warning("%s failed as a CUDA graph (%s); running it without", self.path, error)
                self._drop_graphs()
                return self.run(feeds)
            raise EngineError(f"onnxruntime failed to run {self.path}: {error}") from error
        if release_memory and self.trim_mapped_weights and self._cpu_only():
            trim(self._weight_files)
        return dict(zip(names, values))

    def _drop_graphs(self) -> None:
        with self._lock:
            self._session = self._create_session_for(graphs=False)

    @property
    def last_transfer_seconds(self) -> float | None:
        """CUDA: seconds the last run spent on host<->device copies (None on other providers)."""
        return None if self._device_io is None else self._device_io.last_transfer_seconds

    def close(self) -> None:
        """Release the session; a later call creates it again."""
        with self._lock:
            self._session = None
            self._device_io = None

    def __enter__(self) -> "OnnxRuntimeEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OnnxRuntimeEngine({str(self.path)!r}, providers={[n for n, _ in self.providers]})"


def _has_config(options: ort.SessionOptions, key: str) -> bool:
    try:
        options.get_session_config_entry(key)
    except RuntimeError:
        return False
    return True
