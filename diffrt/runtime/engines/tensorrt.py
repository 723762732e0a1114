"""Native TensorRT engine (provider "trt"): the package's prebuilt plans run through TensorRT and cuda-python.

Which plan: the build records in `<component>/engines/` are compared with this GPU and TensorRT before anything is
deserialized (`tensorrt_records`); per call, the profile that covers the feeds' shapes is chosen. How it runs:
a small pool of execution contexts (TensorRT contexts are not thread-safe; one per concurrent caller), each with
its own stream and, per (profile, shapes), device buffers and pinned host staging allocated once and reused;
copies are async on the context's stream around `execute_async_v3`. With `cuda_graph=True` the TensorRT work of a
shape is captured into a CUDA graph on its first call and replayed after (one launch instead of one per kernel).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from diffrt.errors import ConfigError, EngineError, InputError, invalid
from diffrt.package.names import ENGINES_FOLDER
from diffrt.package.tensorrt_records import (
    EngineRecord,
    Platform,
    describe_profiles,
    pick_profile,
    rebuild_command,
    select_records,
)
from diffrt.runtime.engines import cuda
from diffrt.runtime.engines.base import DimRanges, TensorSpec, adapt_feeds, lossless_cast, validate_feeds

logger = logging.getLogger(__name__)

# Shapes whose buffers (and graph) a context keeps; a pipeline uses one or two shapes per component.
MAX_SHAPES_PER_CONTEXT = 8
ShapeKey = tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]


def import_tensorrt() -> Any:
    """The `tensorrt` module; ConfigError naming the extra to install when it is missing."""
    try:
        import tensorrt
    except ImportError as error:
        raise ConfigError(
            f"provider 'trt' (native TensorRT) needs the tensorrt package, which is not installed: {cuda.INSTALL_HINT}"
        ) from error
    return tensorrt


def check_trt_provider(device_id: int = 0) -> None:
    """Raise ConfigError (tensorrt / cuda-python missing) or EngineError (no usable GPU) naming provider 'trt'."""
    import_tensorrt()
    cuda.cudart()
    cuda.require_device(device_id)


def this_platform(device_id: int = 0) -> Platform:
    """This GPU's name and compute capability and the installed TensorRT version (what records are matched with)."""
    name, sm = cuda.device_properties(device_id)
    return Platform(name, sm, str(import_tensorrt().__version__))


@functools.lru_cache(maxsize=1)
def trt_logger() -> Any:
    """One TensorRT logger for the process (TensorRT keeps the first it is given): forwards to `logging` and
    remembers the latest errors, so an EngineError / ExportError can quote what TensorRT said."""
    trt = import_tensorrt()
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.ERROR, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):  # type: ignore[name-defined]  # a base class from the lazily imported module
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: collections.deque[str] = collections.deque(maxlen=20)

        def log(self, level: Any, message: str) -> None:
            python_level = levels.get(level, logging.DEBUG)
            if python_level >= logging.ERROR:
                self.errors.append(message)
            logging.getLogger("tensorrt").log(python_level, "%s", message)

    return _Logger()


def recent_errors() -> str:
    errors = list(trt_logger().errors)
    return "; ".join(errors[-3:]) if errors else "TensorRT logged no error (run with -v for its log)"


class _Binding:
    """Device buffers and pinned host staging for one (profile, shapes) of one context."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]) -> None:
        self.host: dict[str, cuda.PinnedBuffer] = {}
        self.device: dict[str, cuda.DeviceBuffer] = {}
        try:
            for name, shape in shapes.items():
                self.host[name] = cuda.PinnedBuffer(shape, dtypes[name])
                self.device[name] = cuda.DeviceBuffer(self.host[name].nbytes)
        except BaseException:
            self.free()
            raise
        self.graph: cuda.Graph | None = None
        self.graph_failed = False

    def free(self) -> None:
        graph = getattr(self, "graph", None)
        if graph is not None:
            graph.destroy()
            self.graph = None
        buffers: list[cuda.PinnedBuffer | cuda.DeviceBuffer] = [*self.host.values(), *self.device.values()]
        for buffer in buffers:
            buffer.free()


class _Context:
    """One execution context with its stream and per-shape bindings; used by one caller at a time."""

    def __init__(self, plan: "_Plan") -> None:
        self.plan = plan
        self.context = plan.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {plan.record.plan} "
                              f"(out of GPU memory?): {recent_errors()}")
        self.stream = cuda.Stream()
        self.profile = -1
        self.active: ShapeKey | None = None
        self.bindings: collections.OrderedDict[ShapeKey, _Binding] = collections.OrderedDict()

    def run(self, profile: int, feeds: Mapping[str, np.ndarray], cuda_graph: bool) -> dict[str, np.ndarray]:
        key: ShapeKey = (profile, tuple((name, tuple(feeds[name].shape)) for name in self.plan.input_names))
        binding = self._activate(key, profile, feeds)
        for name in self.plan.input_names:
            binding.host[name].array[...] = feeds[name]
            self.stream.upload(binding.device[name], binding.host[name])
        if binding.graph is not None:
            binding.graph.launch(self.stream)
        else:
            self._execute()
        for name in self.plan.output_names:
            self.stream.download(binding.host[name], binding.device[name])
        self.stream.synchronize()
        outputs = {name: _to_result(binding.host[name].array) for name in self.plan.output_names}
        if cuda_graph and binding.graph is None and not binding.graph_failed:
            self._capture(binding)  # after a plain run: TensorRT sets up a new shape outside any capture
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise EngineError(f"TensorRT failed to run {self.plan.record.plan}: {recent_errors()}")

    def _capture(self, binding: _Binding) -> None:
        try:
            binding.graph = cuda.Graph(self.stream, self._execute)
        except EngineError as error:
            binding.graph_failed = True  # e.g. a plan with data-dependent shapes: keep running it uncaptured
            logger.warning("CUDA graph capture failed for %s; running without a graph: %s", self.plan.record.plan,
                           error)

    def _activate(self, key: ShapeKey, profile: int, feeds: Mapping[str, np.ndarray]) -> _Binding:
        """Point the context at `key`'s shapes and buffers (allocated on first use)."""
        binding = self.bindings.get(key)
        if self.active == key and binding is not None:
            self.bindings.move_to_end(key)
            return binding
        self.active = None  # until the switch below completes (a failure leaves the context's shapes unknown)
        if self.profile != profile:
            if not self.context.set_optimization_profile_async(profile, self.stream.handle):
                raise EngineError(f"TensorRT could not select profile {profile} of {self.plan.record.plan}: "
                                  f"{recent_errors()}")
            self.profile = profile
        for name in self.plan.input_names:
            if not self.context.set_input_shape(name, tuple(feeds[name].shape)):
                raise EngineError(f"TensorRT refused shape {feeds[name].shape} for `{name}` in profile {profile} "
                                  f"of {self.plan.record.plan}: {recent_errors()}")
        # Graphs bake the context's shape state in; after a switch each is captured again.
        for other in self.bindings.values():
            if other.graph is not None:
                other.graph.destroy()
                other.graph = None
        if binding is None:
            binding = self._allocate(key, feeds)
        for name, buffer in binding.device.items():
            if not self.context.set_tensor_address(name, buffer.ptr):
                raise EngineError(f"TensorRT refused the address of `{name}`: {recent_errors()}")
        self.active = key
        return binding

    def _allocate(self, key: ShapeKey, feeds: Mapping[str, np.ndarray]) -> _Binding:
        shapes = {name: tuple(feeds[name].shape) for name in self.plan.input_names}
        for name in self.plan.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(size < 0 for size in shape):
                raise EngineError(f"TensorRT could not infer the shape of output `{name}` ({shape}) for inputs "
                                  f"{shapes}: {recent_errors()}")
            shapes[name] = shape
        while len(self.bindings) >= MAX_SHAPES_PER_CONTEXT:
            _, old = self.bindings.popitem(last=False)
            old.free()
        binding = _Binding(shapes, self.plan.dtypes)
        self.bindings[key] = binding
        return binding

    def close(self) -> None:
        for binding in self.bindings.values():
            binding.free()
        self.bindings.clear()
        self.stream.destroy()
        self.context = None


def _to_result(array: np.ndarray) -> np.ndarray:
    """A copy the caller owns (the pinned buffer is reused), float outputs as float32."""
    return array.astype(np.float32) if array.dtype.kind == "f" else array.copy()


class _Plan:
    """One deserialized plan and its pool of execution contexts."""

    def __init__(self, record: EngineRecord, max_contexts: int, overrides: Mapping[str, np.ndarray] | None = None,
                 model: Path | None = None) -> None:
        trt = import_tensorrt()
        self.record = record
        self.runtime = trt.Runtime(trt_logger())  # must outlive the engine
        if record.flags.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # the plan embeds its own (lean) runtime
        self.engine = self.runtime.deserialize_cuda_engine(record.plan.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {record.plan} (a null engine): {recent_errors()}; "
                              f"rebuild it with `diffrt build-engines PACKAGE --rebuild`")
        if overrides:
            from diffrt.runtime.engines.tensorrt_refit import refit_engine

            assert model is not None
            refit_engine(self.engine, overrides, model, record.plan, trt, trt_logger(), recent_errors)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.specs = {n: TensorSpec(n, self.dtypes[n], _dims(self.engine.get_tensor_shape(n))) for n in names}
        self._max = max_contexts
        self._idle: list[_Context] = []
        self._created = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def context(self) -> Iterator[_Context]:
        """An idle context, a new one while fewer than `max_contexts` exist, else wait for one."""
        with self._cond:
            while not self._idle and self._created >= self._max:
                self._cond.wait()
            context = self._idle.pop() if self._idle else None
            if context is None:
                self._created += 1
        if context is None:
            try:
                context = _Context(self)
            except BaseException:
                with self._cond:
                    self._created -= 1
                    self._cond.notify()
                raise
        try:
            yield context
        finally:
            with self._cond:
                self._idle.append(context)
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            for context in self._idle:
                context.close()
            self._idle.clear()
            self._created = 0
        self.engine = None


def _dims(shape: Any) -> tuple[int | None, ...]:
    return tuple(None if int(size) < 0 else int(size) for size in shape)


class TensorRTEngine:
    """A component run from its prebuilt TensorRT plans (see the module docstring).

    Args:
        path: the component's `model.onnx`; its plans and records are in `engines/` beside it.
        device_id: the CUDA device to run on.
        cuda_graph: capture each shape's run into a CUDA graph on first use and replay it after.
        max_contexts: execution contexts (concurrent callers) per plan; each holds its own activation memory.
        initializers: {ONNX initializer name: array} replacing those the plans were built with (LoRA, textual
            inversion), through TensorRT refit; the plans must have been built with `--refit`.
        dim_ranges, input_specs, output_specs: the manifest's, checked before each run (default: the plan's).
        threads: accepted for compatibility with the CPU engines' option and ignored.
    """

    def __init__(
        self,
        path: str | Path,
        device_id: int = 0,
        cuda_graph: bool = False,
        max_contexts: int = 2,
        dim_ranges: DimRanges | None = None,
        input_specs: Sequence[TensorSpec] | None = None,
        output_specs: Sequence[TensorSpec] | None = None,
        threads: int | None = None,
        initializers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        _check_options(device_id, cuda_graph, max_contexts)
        self.path = Path(path)
        self.folder = self.path.parent / ENGINES_FOLDER
        self.component = self.path.parent.name
        self.device_id = device_id
        self.cuda_graph = cuda_graph
        self.max_contexts = max_contexts
        self.dim_ranges = dict(dim_ranges or {})
        check_trt_provider(device_id)
        cuda.set_device(device_id)
        self.platform = this_platform(device_id)
        self.records = select_records(self.folder, self.platform, self.component, self.path.parent.parent)
        self._initializers = initializers or {}
        if self._initializers:
            from diffrt.runtime.engines.tensorrt_refit import not_refittable

            fixed = not_refittable(self.records)
            if fixed:
                raise ConfigError(f"{fixed[0].plan} was built without --refit, so adapters cannot change the weights "
                                  f"of `{self.component}`: {rebuild_command(self.path.parent.parent)} --refit")
        self._plans: dict[str, _Plan] = {}
        self._lock = threading.Lock()
        self._inputs = list(input_specs) if input_specs else None
        self._outputs = list(output_specs) if output_specs else None

    def _plan(self, record: EngineRecord) -> _Plan:
        plan = self._plans.get(record.key)
        if plan is None:
            with self._lock:
                plan = self._plans.get(record.key)
                if plan is None:
                    cuda.set_device(self.device_id)
                    plan = _Plan(record, self.max_contexts, self._initializers, self.path)
                    self._check_plan(plan)
                    self._plans[record.key] = plan
                    logger.info("loaded TensorRT engine %s for %s", record.plan, self.component)
        return plan

    def _check_plan(self, plan: _Plan) -> None:
        """The plan's IO must be the manifest's: a plan copied in from another package would misread feeds."""
        if self._inputs is not None and sorted(plan.input_names) != sorted(s.name for s in self._inputs):
            raise EngineError(f"{plan.record.plan} takes inputs {plan.input_names}, but the manifest of "
                              f"`{self.component}` lists {[s.name for s in self._inputs]}; rebuild it with "
                              f"`diffrt build-engines PACKAGE --rebuild`")
        count = plan.engine.num_optimization_profiles
        if count != len(plan.record.profiles):
            raise EngineError(f"{plan.record.plan} has {count} profiles but its record lists "
                              f"{len(plan.record.profiles)}; rebuild it")

    @property
    def inputs(self) -> list[TensorSpec]:
        if self._inputs is None:
            plan = self._plan(self.records[0])
            self._inputs = [plan.specs[n] for n in plan.input_names]
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        if self._outputs is None:
            plan = self._plan(self.records[0])
            self._outputs = [plan.specs[n] for n in plan.output_names]
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray], release_memory: bool = False) -> dict[str, np.ndarray]:
        """Validate `feeds`, pick the plan and profile covering their shapes, run; outputs by name (float32).
        `release_memory` changes nothing: an execution context's device memory is sized once, at creation."""
        specs = self.inputs
        feeds = adapt_feeds(specs, feeds)
        validate_feeds(specs, feeds, self.dim_ranges)
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        chosen = pick_profile(self.records, shapes)
        if chosen is None:
            raise self._uncovered(shapes)
        record, profile = chosen
        plan = self._plan(record)
        feeds = {name: lossless_cast(name, np.ascontiguousarray(feeds[name]), plan.dtypes[name])
                 for name in plan.input_names}
        cuda.set_device(self.device_id)  # the CUDA device is per thread; callers may come from any thread
        with plan.context() as context:
            return context.run(profile, feeds, self.cuda_graph)

    def _uncovered(self, shapes: Mapping[str, tuple[int, ...]]) -> InputError:
        given = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        package = self.path.parent.parent
        return InputError(
            f"`{self.component}` inputs ({given}) are outside every TensorRT profile built for it:\n"
            f"{describe_profiles(self.records)}\nbuild engines that cover them, e.g. "
            f"`diffrt build-engines {package} --bucket HxW` or a range with --min-size/--max-size/--batch"
        )

    def close(self) -> None:
        """Free the contexts, buffers and engines (not while another thread runs); a later run loads again."""
        with self._lock:
            for plan in self._plans.values():
                plan.close()
            self._plans.clear()

    def __enter__(self) -> "TensorRTEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorRTEngine({str(self.path)!r}, device_id={self.device_id}, records={len(self.records)})"


def _check_options(device_id: Any, cuda_graph: Any, max_contexts: Any) -> None:
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise invalid("device_id", "an int >= 0 (a CUDA device index)", device_id, ConfigError)
    if not isinstance(cuda_graph, bool):
        raise invalid("cuda_graph", "True or False", cuda_graph, ConfigError)
    if isinstance(max_contexts, bool) or not isinstance(max_contexts, int) or max_contexts < 1:
        raise invalid("max_contexts", "an int >= 1", max_contexts, ConfigError)
