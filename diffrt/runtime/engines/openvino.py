"""OpenVINO engine: a package's ONNX files compiled for the CPU by OpenVINO (`pip install diffrt[openvino]`).

Issue #8: on CPUs OpenVINO runs the same ONNX files faster than ONNX Runtime, and with bf16 inference precision (on
CPUs with avx512_bf16 or AMX) about twice as fast again. OpenVINO silently runs f32 when bf16 is asked for on a CPU
without it, so the precision is checked against the CPU before compiling and against the compiled model after.
Compiled models are cached on disk (`CACHE_DIR`) so a second start skips compilation. With `static_shapes`, each feed
shape gets its own reshaped, compiled model (a small LRU), which lets OpenVINO pick kernels for fixed sizes.
Compiled models are thread-safe but infer requests are not: each call borrows a request from a per-model pool.
Issue #19: "int8" quantizes the read model with NNCF first (`diffrt.runtime.engines.int8`), on CPUs with VNNI or AMX.
LoRA and textual inversion replace initializers: OpenVINO's ONNX reader keeps each initializer as a Constant named
after it, so the read model's Constants are swapped for the new arrays before anything is compiled.
Memory (issue #19): OpenVINO memory-maps external weight files and cache blobs, copies every weight into its own
repacked buffers while compiling, and keeps the mapping as long as the compiled model lives; the pages the compile
read stayed resident, so a static-shape fp32 SD 1.5 UNet took 6.8 GiB (10.0 GiB on a compile-cache hit) instead of
3.6 GiB. `trim_mapped_weights` (default) drops them from the resident set during and after each compile
(`residency.py`); a static-shape model does not read them again (a dynamic-shape one reads 2.4 GiB of them in place
at every run, which come back; docs/benchmarks.md). Weights inside the ONNX file (the text encoders, the VAE) are
read into the heap instead, and the compiled model keeps that copy beside its own; with `optimized_model_cache`,
such a model is saved once as OpenVINO IR there and read from it, so its weights are a mapped file as well. Dropping
the read `ov.Model` frees nothing: the compiled model holds the constants it was built from, so the engine keeps it
for later shapes.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from diffrt.errors import ConfigError, DiffrtError, EngineError, invalid
from diffrt.package.files import AtomicFolder, files_fingerprint
from diffrt.runtime.engines.base import DimRanges, TensorSpec, adapt_feeds, validate_feeds
from diffrt.runtime.engines.int8 import Calibration
from diffrt.runtime.engines.residency import trimming

logger = logging.getLogger(__name__)

#: our precision names -> OpenVINO's INFERENCE_PRECISION_HINT values; "auto" picks bf16 where the CPU has it, and
#: "int8" quantizes the model and runs what stays float in bf16 where the CPU has it
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
PRECISION_CHOICES = ("fp32", "bf16", "int8", "auto")
# Without these OpenVINO emulates bf16 (or ignores the hint), which is slower than f32, not faster.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
ShapeKey = tuple[tuple[int, ...], ...]
#: an ONNX file larger than this carries weights inside its protobuf (a graph alone is a few MB even for SDXL's UNet)
INLINE_WEIGHTS_BYTES = 16 << 20

_core_lock = threading.Lock()
_core: Any = None


def openvino_available() -> bool:
    """Whether the `openvino` package can be imported here."""
    try:
        import_openvino()
    except ConfigError:
        return False
    return True


def import_openvino() -> Any:
    """The `openvino` module, or a `ConfigError` naming the `provider` option when it is not installed."""
    try:
        import openvino
    except ImportError as error:
        raise ConfigError(
            "`provider` 'openvino' needs the openvino package, which is not installed here; "
            "install it with `pip install 'diffrt[openvino]'` or choose provider 'cpu' (ONNX Runtime)"
        ) from error
    return openvino


def core() -> Any:
    """One `openvino.Core` per process: creating it loads the device plugins, which takes a while."""
    global _core
    with _core_lock:
        if _core is None:
            _core = import_openvino().Core()
        return _core


def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_capabilities() -> list[str]:
    """OpenVINO's report of what its CPU plugin runs natively here ("FP32", "BF16", "INT8", ...)."""
    return list(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_support() -> tuple[bool, str]:
    """(whether bf16 inference runs natively on this CPU, a description of what was found)."""
    capabilities = cpu_capabilities()
    flags = cpu_flags()
    native = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    # Without /proc/cpuinfo (not Linux) OpenVINO's own report is all there is.
    supported = "BF16" in capabilities and (bool(native) or not flags)
    found = f"OpenVINO CPU capabilities {capabilities}, CPU flags {native or 'without ' + ' / '.join(BF16_CPU_FLAGS)}"
    return supported, found


def int8_support() -> tuple[bool, str]:
    """(whether int8 kernels run natively on this CPU: VNNI or AMX, a description of what was found)."""
    from diffrt.runtime.engines import int8

    return int8.int8_support(cpu_flags(), cpu_capabilities())


def resolve_precision(precision: str) -> str:
    """"fp32" | "bf16" | "int8" | "auto" -> "fp32", "bf16" or "int8"; bf16 or int8 on a CPU without it is a
    `ConfigError` naming the instructions it needs."""
    if precision not in PRECISION_CHOICES:
        raise invalid("inference_precision", f"one of {', '.join(map(repr, PRECISION_CHOICES))}", precision,
                      ConfigError)
    if precision == "fp32":
        return "fp32"
    if precision == "int8":
        from diffrt.runtime.engines import int8

        int8.require_int8(cpu_flags(), cpu_capabilities())
        return "int8"
    supported, found = bf16_support()
    if precision == "auto":
        chosen = "bf16" if supported else "fp32"
        logger.info("inference_precision 'auto' chose %s (%s)", chosen, found)
        return chosen
    if not supported:
        raise ConfigError(
            f"`inference_precision` 'bf16' needs a CPU with {' or '.join(BF16_CPU_FLAGS)} (AVX-512 BF16 or AMX); "
            f"this one has neither ({found}); use 'fp32', or 'auto' to pick bf16 only where it is supported"
        )
    return "bf16"


def _spec(port: Any, declared: TensorSpec | None) -> TensorSpec:
    """A port as a TensorSpec: OpenVINO keeps fixed dims; named dynamic dims come from the manifest's entry."""
    name = port.get_any_name()
    dtype = np.dtype(port.get_element_type().to_dtype())
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    if declared is None:
        return TensorSpec(name, dtype, shape)
    if declared.dtype != dtype or len(declared.shape) != len(shape) or any(
        isinstance(m, int) and isinstance(d, int) and m != d for m, d in zip(shape, declared.shape)
    ):
        found = TensorSpec(name, dtype, shape).describe()
        raise EngineError(f"the manifest declares `{name}` as {declared.describe()} but the model has {found}")
    return TensorSpec(name, dtype, tuple(m if isinstance(m, int) else d for m, d in zip(shape, declared.shape)))


def _merge_specs(ports: Sequence[Any], declared: Sequence[TensorSpec] | None, kind: str) -> list[TensorSpec]:
    by_name = {spec.name: spec for spec in declared or []}
    names = [port.get_any_name() for port in ports]
    if declared is not None and set(names) != set(by_name):
        raise EngineError(f"the manifest's {kind} {sorted(by_name)} differ from the model's {sorted(names)}")
    return [_spec(port, by_name.get(port.get_any_name())) for port in ports]


def replace_constants(model: Any, arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """Swap the Constants named after ONNX initializers for `arrays` (same element type; a different leading
    size is allowed, as a token embedding with added tokens has), then re-infer the model's types and shapes."""
    ov = import_openvino()
    found = {op.get_friendly_name(): op for op in model.get_ops()
             if op.get_type_name() == "Constant" and op.get_friendly_name() in arrays}
    missing = sorted(set(arrays) - set(found))
    if missing:
        raise EngineError(f"cannot override initializers of {path} with OpenVINO: no constant named "
                          f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for name, op in found.items():
        value = np.ascontiguousarray(arrays[name], dtype=op.get_output_element_type(0).to_dtype())
        replacement = ov.op.Constant(value)
        replacement.set_friendly_name(name)
        op.output(0).replace(replacement.output(0))
    model.validate_nodes_and_infer_types()


class _Compiled:
    """A compiled model and a pool of its infer requests, one borrowed per running call."""

    def __init__(self, compiled: Any) -> None:
        self.model = compiled
        self._idle: list[Any] = []
        self._busy = 0
        self._lock = threading.Lock()

    def release_memory(self) -> None:
        """Free the intermediate buffers the requests keep between inferences, unless one is running."""
        with self._lock:
            if self._busy == 0:
                self.model.release_memory()

    @contextlib.contextmanager
    def request(self) -> Iterator[Any]:
        with self._lock:
            request = self._idle.pop() if self._idle else None
            self._busy += 1
        try:
            if request is None:
                request = self.model.create_infer_request()
            yield request
        finally:
            with self._lock:
                self._busy -= 1
                if request is not None:
                    self._idle.append(request)


class OpenVINOEngine:
    """An ONNX model compiled by OpenVINO for the CPU; see the module docstring.

    Args:
        path: the `model.onnx` file (external data beside it).
        inference_precision: "fp32" | "bf16" (needs avx512_bf16 or AMX) | "int8" (needs VNNI or AMX and nncf; the
            rest of the model runs bf16 where the CPU has it) | "auto" (bf16 where supported).
        threads: inference threads; default: OpenVINO's choice (the physical cores).
        optimized_model_cache: OpenVINO's `CACHE_DIR` for compiled models (a subfolder per float precision), reused by
            later starts, and the OpenVINO IR copy of an ONNX file with its weights inside (read instead of it:
            mapped, not copied); None: no cache.
        static_shapes: compile one model per feed shape (reshaped to it) instead of one dynamic-shape model.
        static_cache_size: how many per-shape compiled models to keep (least recently used is dropped).
        dim_ranges: inclusive (low, high) per named dynamic dimension, checked before each run.
        input_specs, output_specs: the manifest's specs; they name the dynamic dims (ONNX names are lost).
        initializers: {initializer name: array} replacing those of the model file (LoRA, textual inversion), swapped
            into the read model before compilation; the compiled-model cache is not used then (each adapter set is
            its own model, and caching every one would fill the disk). Not with "int8".
        trim_mapped_weights: while and after compiling, drop the pages of the memory-mapped weight files (the
            component's folder; the cache blob under `optimized_model_cache`) from this process's resident set;
            they stay in the page cache and are read back only if touched (see the module docstring). Linux only;
            a no-op elsewhere. False keeps them resident (about the weights' size more RSS).
        calibration: with "int8", the feeds to calibrate activation ranges on (`int8.Calibration`): hybrid int8;
            without, the weights only are int8 (less memory, not faster). The quantized model is kept in
            `optimized_model_cache`/int8 (default `$DIFFRT_CACHE/openvino-int8`), keyed by model files and calibration.
    """

    def __init__(
        self,
        path: str | Path,
        inference_precision: str = "fp32",
        threads: int | None = None,
        optimized_model_cache: str | Path | None = None,
        static_shapes: bool = False,
        static_cache_size: int = 4,
        dim_ranges: DimRanges | None = None,
        input_specs: Sequence[TensorSpec] | None = None,
        output_specs: Sequence[TensorSpec] | None = None,
        initializers: Mapping[str, np.ndarray] | None = None,
        trim_mapped_weights: bool = True,
        calibration: Calibration | None = None,
    ) -> None:
        import_openvino()
        self.path = Path(path)
        if not self.path.is_file():
            raise invalid("path", "an existing ONNX model file", str(self.path), EngineError)
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise invalid("threads", "None or an integer >= 1", threads, ConfigError)
        if not isinstance(static_shapes, bool):
            raise invalid("static_shapes", "True or False", static_shapes, ConfigError)
        if not isinstance(static_cache_size, int) or isinstance(static_cache_size, bool) or static_cache_size < 1:
            raise invalid("static_cache_size", "an integer >= 1", static_cache_size, ConfigError)
        if not isinstance(trim_mapped_weights, bool):
            raise invalid("trim_mapped_weights", "True or False", trim_mapped_weights, ConfigError)
        if calibration is not None and not isinstance(calibration, Calibration):
            raise invalid("calibration", "None or a diffrt.runtime.engines.int8.Calibration", calibration, ConfigError)
        self.inference_precision = resolve_precision(inference_precision)
        if self.inference_precision == "int8" and initializers:
            raise ConfigError("`inference_precision` 'int8' cannot be combined with replaced initializers (LoRA): "
                              "each adapter set would be quantized again, which takes minutes; use 'bf16' or 'fp32'")
        #: what OpenVINO runs the float part in: bf16 or fp32 (int8 models keep some operations float)
        self.float_precision = self.inference_precision
        if self.inference_precision == "int8":
            self.float_precision = "bf16" if bf16_support()[0] else "fp32"
        self.calibration = calibration
        self.threads = threads
        self.optimized_model_cache = Path(optimized_model_cache) if optimized_model_cache is not None else None
        self.static_shapes = static_shapes
        self.static_cache_size = static_cache_size
        self.trim_mapped_weights = trim_mapped_weights
        self.dim_ranges = dict(dim_ranges or {})
        self._declared = (input_specs, output_specs)
        self._initializers = dict(initializers or {})
        self._lock = threading.Lock()
        self._model: Any = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._compiled: OrderedDict[ShapeKey | None, _Compiled] = OrderedDict()
        #: how many models this engine has compiled (a cache hit in `optimized_model_cache` counts too)
        self.compilations = 0

    # ----- model and compiled models -----
    def _read_model(self) -> Any:
        """The ov.Model, read on first use; reading records the specs."""
        with self._lock:
            if self._model is None:
                model = self._cached_int8() if self.inference_precision == "int8" else None
                quantize = model is None and self.inference_precision == "int8"
                if model is None:
                    try:
                        model = self._read_source()
                    except Exception as error:  # OpenVINO raises its own RuntimeError subclasses
                        raise EngineError(f"openvino could not read {self.path}: {error}") from error
                if self._initializers:
                    replace_constants(model, self._initializers, self.path)
                # the int8 model keeps the float model's inputs and outputs
                self._inputs = _merge_specs(model.inputs, self._declared[0], "inputs")
                self._outputs = _merge_specs(model.outputs, self._declared[1], "outputs")
                if quantize:
                    model = self._quantized(model)
                self._model = model
            return self._model

    def _ir_copy(self) -> Path | None:
        """Where the OpenVINO IR copy of `path` lives in `optimized_model_cache`, keyed by the file and OpenVINO's
        version; None when there is no cache or the ONNX file holds no weights of its own."""
        stat = self.path.stat()
        if self.optimized_model_cache is None or stat.st_size <= INLINE_WEIGHTS_BYTES:
            return None
        key = files_fingerprint([self.path], import_openvino().__version__)
        return self.optimized_model_cache / f"openvino-ir-{self.path.parent.name}-{self.path.stem}-{key}"

    def _read_source(self) -> Any:
        """The ov.Model of `path`, from its IR copy where there is one (written on first use)."""
        folder = self._ir_copy()
        if folder is None:
            return core().read_model(str(self.path))
        if not (folder / "model.xml").is_file():
            model = core().read_model(str(self.path))
            with AtomicFolder(folder) as temp:
                # compress_to_fp16 would halve the weights on disk: a different model, not a copy
                import_openvino().save_model(model, str(temp / "model.xml"), compress_to_fp16=False)
            del model
            logger.info("saved an OpenVINO IR copy of %s in %s (its weights are mapped from there)", self.path, folder)
        return core().read_model(str(folder / "model.xml"))

    def _int8_cache(self) -> Path:
        from diffrt.runtime.engines import int8

        return (self.optimized_model_cache / "int8" if self.optimized_model_cache is not None
                else int8.default_cache_dir())

    def _cached_int8(self) -> Any | None:
        from diffrt.runtime.engines import int8

        return int8.cached_model(core(), self.path, self.calibration, self._int8_cache())

    def _quantized(self, model: Any) -> Any:
        from diffrt.runtime.engines import int8

        return int8.quantized_model(core(), model, self.path, self.calibration, self._int8_cache(),
                                    lambda feeds: adapt_feeds(self._inputs, feeds))

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",  # one stream, all threads on one request: a pipeline runs one at a time
            "INFERENCE_PRECISION_HINT": PRECISIONS[self.float_precision],
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.optimized_model_cache is not None and not self._initializers:
            # OpenVINO's blob name hashes the model and not the precision hint: an fp32 and a bf16 engine of one
            # model sharing a CACHE_DIR imported each other's blob (NaN images). One folder per precision.
            blobs = self.optimized_model_cache / f"openvino-{self.float_precision}"
            blobs.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(blobs)
        return config

    def _mapped_folders(self) -> list[Path]:
        """Where the files OpenVINO maps for this model live: its folder (external data), the cache (blobs, IR), the
        int8 model's folder."""
        folders = [self.path.parent]
        if self.optimized_model_cache is not None:
            folders.append(self.optimized_model_cache)  # holds the int8 model's folder too
        elif self.inference_precision == "int8":
            folders.append(self._int8_cache())
        return folders

    def _compile(self, model: Any, key: ShapeKey | None) -> _Compiled:
        config = self._config()
        trimmed = trimming(self._mapped_folders()) if self.trim_mapped_weights else contextlib.nullcontext()
        try:
            with trimmed:
                compiled = core().compile_model(model, "CPU", config)
        except Exception as error:
            raise EngineError(f"openvino could not compile {self.path} for shapes {key}: {error}") from error
        got = compiled.get_property("INFERENCE_PRECISION_HINT")
        types = import_openvino().Type
        wanted = types.bf16 if self.float_precision == "bf16" else types.f32
        if got != wanted:  # OpenVINO falls back without telling; diffrt never does
            raise EngineError(f"openvino compiled {self.path} with inference precision {got}, not {wanted}")
        self.compilations += 1
        logger.info("compiled %s for CPU (%s%s)", self.path, self.inference_precision,
                    f", static shapes {key}" if key else ", dynamic shapes")
        return _Compiled(compiled)

    def _compiled_for(self, feeds: Mapping[str, np.ndarray]) -> _Compiled:
        """The compiled model for these feeds: the dynamic one, or the per-shape one (compiled on first use)."""
        model = self._read_model()
        key = tuple(feeds[spec.name].shape for spec in self._inputs) if self.static_shapes else None
        with self._lock:
            entry = self._compiled.get(key)
            if entry is not None:
                self._compiled.move_to_end(key)
                return entry
            if key is not None:
                model = model.clone()  # reshape changes the model in place; keep the dynamic original
                model.reshape({spec.name: list(shape) for spec, shape in zip(self._inputs, key)})
            entry = self._compile(model, key)
            self._compiled[key] = entry
            while len(self._compiled) > self.static_cache_size:
                evicted, _ = self._compiled.popitem(last=False)
                logger.debug("dropped the compiled model of %s for shapes %s", self.path, evicted)
            return entry

    # ----- Engine protocol -----
    @property
    def inputs(self) -> list[TensorSpec]:
        self._read_model()
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        self._read_model()
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        """Validate `feeds` (names, dtypes, ranks, dims, ranges) and run; outputs by name, as numpy arrays.
        `release_memory`: free the compiled model's intermediate buffers after this run."""
        self._read_model()
        feeds = adapt_feeds(self._inputs, feeds)
        validate_feeds(self._inputs, feeds, self.dim_ranges)
        entry = self._compiled_for(feeds)
        try:
            with entry.request() as request:
                # infer copies the outputs out of the request's buffers, so they outlive the request's next use
                result = request.infer({name: np.ascontiguousarray(value) for name, value in feeds.items()})
                values = [result[port] for port in entry.model.outputs]
            if release_memory:  # after the request went back to the pool: none of this call's is running
                entry.release_memory()
        except DiffrtError:
            raise
        except Exception as error:
            raise EngineError(f"openvino failed to run {self.path}: {error}") from error
        return {spec.name: value for spec, value in zip(self._outputs, values)}

    def close(self) -> None:
        """Release the compiled models; a later call compiles again (from `optimized_model_cache` if set)."""
        with self._lock:
            self._compiled.clear()

    def __enter__(self) -> "OpenVINOEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "static" if self.static_shapes else "dynamic"
        return f"OpenVINOEngine({str(self.path)!r}, inference_precision={self.inference_precision!r}, shapes={mode})"
