"""OnnxRuntimeEngine and the shared feed checks, on small ONNX graphs built here and run by real ORT sessions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from concurrency import run_in_threads
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import save_graph

from diffrt.errors import ConfigError, EngineError, InputError
from diffrt.package.reader import ComponentInfo
from diffrt.runtime.engines import OnnxRuntimeEngine, TensorSpec, check_provider, create_engine, validate_feeds
from diffrt.runtime.engines.base import lossless_cast
from diffrt.runtime.engines.onnxruntime import physical_cores

HIDDEN = 32  # 32 x 32 float32 weight = 4 KiB, above ORT's 1 KiB threshold for external initializers


def weight() -> np.ndarray:
    return (np.arange(HIDDEN * HIDDEN, dtype=np.float32).reshape(HIDDEN, HIDDEN) % 7 - 3) / 10


def build_model(path: Path, external_data: bool = False) -> Path:
    """out = (x + y) @ W with x, y [batch, n, 32] float32; t_out = t, an int64 [batch] input (like a timestep)."""
    nodes = [
        helper.make_node("Add", ["x", "y"], ["sum"]),
        helper.make_node("MatMul", ["sum", "W"], ["out"]),
        helper.make_node("Identity", ["t"], ["t_out"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", HIDDEN]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n", HIDDEN]),
        helper.make_tensor_value_info("t", TensorProto.INT64, ["batch"]),
    ]
    outputs = [
        helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "n", HIDDEN]),
        helper.make_tensor_value_info("t_out", TensorProto.INT64, ["batch"]),
    ]
    return save_graph(path, nodes, inputs, outputs, [numpy_helper.from_array(weight(), "W")], "add_matmul",
                      external_data)


def feeds(batch: int = 2, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, n, HIDDEN), dtype=np.float32),
        "y": rng.standard_normal((batch, n, HIDDEN), dtype=np.float32),
        "t": np.arange(batch, dtype=np.int64) * 100 + 1,
    }


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("engine") / "unet" / "model.onnx")


@pytest.fixture(scope="module")
def engine(model_path: Path) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(model_path, threads=1)


# ----- running -----
def test_run_matches_numpy_reference(engine: OnnxRuntimeEngine) -> None:
    f = feeds()
    out = engine.run(f)
    expected = (f["x"] + f["y"]) @ weight()
    np.testing.assert_allclose(out["out"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["t_out"], f["t"])
    assert set(out) == {"out", "t_out"} and out["out"].dtype == np.float32


def test_specs_report_names_dtypes_and_symbolic_dims(engine: OnnxRuntimeEngine) -> None:
    assert engine.inputs == [
        TensorSpec("x", np.dtype(np.float32), ("batch", "n", HIDDEN)),
        TensorSpec("y", np.dtype(np.float32), ("batch", "n", HIDDEN)),
        TensorSpec("t", np.dtype(np.int64), ("batch",)),
    ]
    assert [spec.name for spec in engine.outputs] == ["out", "t_out"]


def test_dynamic_dims_accept_other_sizes(engine: OnnxRuntimeEngine) -> None:
    f = feeds(batch=1, n=7)
    np.testing.assert_allclose(engine.run(f)["out"], (f["x"] + f["y"]) @ weight(), rtol=1e-5, atol=1e-5)


# ----- validation: each error names the input, the expectation and what was got -----
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("t"), r"`t` is a required input of this engine \(inputs: x, y, t\); got feeds for: x, y"),
        (lambda f: f.update(z=f["x"]), r"`z` is not an input of this engine; expected only: x, y, t"),
        (lambda f: f.update(x=f["x"][0]), r"`x` must have rank 3 \(shape \[batch, n, 32\]\); got shape \(3, 32\)"),
        (lambda f: f.update(y=f["y"][..., :31]), r"`y` dimension 2 must be 32 \(shape \[batch, n, 32\]\); got shape"),
        (lambda f: f.update(y=f["y"][:1]), r"`y` dimension 0 \('batch'\) must equal 2 as in `x`; got 1"),
        (lambda f: f.update(t=np.array([1, 2, 3])), r"`t` dimension 0 \('batch'\) must equal 2 as in `x`; got 3"),
        (lambda f: f.update(x=f["x"].astype(np.float64) + 0.1), r"`x` must have dtype float32; got float64 whose"),
        (lambda f: f.update(t=np.array([1.5, 2.0])), r"`t` must have dtype int64; got float64 whose values do not"),
        (lambda f: f.update(t=np.array([np.nan, 1.0])), r"`t` must have dtype int64; got float64 with non-finite"),
        (lambda f: f.update(t=np.array(["a", "b"])), r"`t` must have dtype int64; got <U1"),
        (lambda f: f.update(x=[[0.0]]), r"`x` must be a numpy.ndarray; got list"),
    ],
)
def test_invalid_feeds_raise_input_error_before_running(engine: OnnxRuntimeEngine, change, message) -> None:
    f = feeds()
    change(f)
    with pytest.raises(InputError, match=message):
        engine.run(f)


def test_dim_ranges_from_the_manifest_are_enforced(model_path: Path) -> None:
    engine = OnnxRuntimeEngine(model_path, threads=1, dim_ranges={"batch": (1, 2), "n": (2, 8)})
    engine.run(feeds(batch=2, n=8))
    with pytest.raises(InputError, match=r"`x` dimension 0 \('batch'\) must be in \[1, 2\]; got 3"):
        engine.run(feeds(batch=3))
    with pytest.raises(InputError, match=r"`x` dimension 1 \('n'\) must be in \[2, 8\]; got 1"):
        engine.run(feeds(n=1))


def test_validate_feeds_checks_dtype_without_adapting_and_returns_bound_dims() -> None:
    specs = [TensorSpec("sample", np.float32, ("batch", 4, "h", "w")), TensorSpec("timestep", np.int64, ("batch",))]
    good = {"sample": np.zeros((2, 4, 8, 6), np.float32), "timestep": np.zeros(2, np.int64)}
    assert validate_feeds(specs, good) == {"batch": 2, "h": 8, "w": 6}
    with pytest.raises(InputError, match=r"`timestep` must have dtype int64; got int32"):
        validate_feeds(specs, {**good, "timestep": np.zeros(2, np.int32)})


def test_lossless_conversions_are_applied_and_lossy_ones_refused() -> None:
    # Optimum packages: an int64 timestep fed from a float32 / int32 schedule, a float16 timestep from float32.
    assert lossless_cast("t", np.array([999.0, 1.0], np.float32), np.dtype(np.int64)).dtype == np.int64
    assert lossless_cast("t", np.array([7], np.int32), np.dtype(np.int64)).tolist() == [7]
    assert lossless_cast("t", np.array([981.0], np.float32), np.dtype(np.float16)).dtype == np.float16
    with pytest.raises(InputError, match="`t` must have dtype float16; got float32"):
        lossless_cast("t", np.array([981.37], np.float32), np.dtype(np.float16))
    with pytest.raises(InputError, match="`t` must have dtype int32; got int64"):
        lossless_cast("t", np.array([2**40], np.int64), np.dtype(np.int32))


def test_run_converts_int32_and_integral_float_timesteps(engine: OnnxRuntimeEngine) -> None:
    f = feeds()
    expected = engine.run(f)
    for t in (f["t"].astype(np.int32), f["t"].astype(np.float32)):
        out = engine.run({**f, "t": t})
        np.testing.assert_array_equal(out["out"], expected["out"])
        assert out["t_out"].dtype == np.int64 and out["t_out"].tolist() == f["t"].tolist()


# ----- providers and options -----
def test_unavailable_provider_is_an_error_naming_it_and_listing_available(model_path: Path) -> None:
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # this CPU-only test box
    with pytest.raises(EngineError, match=r"`provider` 'cuda' \(CUDAExecutionProvider\) is not available") as info:
        OnnxRuntimeEngine(model_path, provider="cuda")
    assert str(ort.get_available_providers()) in str(info.value)
    with pytest.raises(EngineError, match="'TensorrtExecutionProvider'|'tensorrt'"):
        check_provider("tensorrt")
    with pytest.raises(EngineError, match="'NoSuchExecutionProvider'"):
        check_provider(["CPUExecutionProvider", ("NoSuchExecutionProvider", {})])


def test_provider_lists_with_options_are_accepted(model_path: Path) -> None:
    options = {"arena_extend_strategy": "kSameAsRequested"}
    engine = OnnxRuntimeEngine(model_path, provider=[("CPUExecutionProvider", options)])
    engine.run(feeds())
    assert engine.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threads": 0}, r"`threads` must be None or an integer >= 1; got 0"),
        ({"graph_optimization_level": "max"}, r"`graph_optimization_level` must be one of disable, basic, extended"),
        ({"provider": [("cpu", "fast")]}, r"`provider` must be a name or a \(name, options dict\) tuple"),
        ({"disabled_optimizers": "NchwcTransformer"}, r"`disabled_optimizers` must be a list of ONNX Runtime"),
    ],
)
def test_invalid_engine_options_are_errors_naming_them(model_path: Path, kwargs, message) -> None:
    # a configuration error (a ValueError: the CLI exits with status 2), not an engine failure
    with pytest.raises(ConfigError, match=message):
        OnnxRuntimeEngine(model_path, **kwargs)


def test_missing_or_corrupt_model_file_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"`path` must be an existing ONNX model file"):
        OnnxRuntimeEngine(tmp_path / "nope.onnx")
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"not a protobuf")
    engine = OnnxRuntimeEngine(corrupt)  # lazy: nothing is loaded yet
    with pytest.raises(EngineError, match="onnxruntime could not load .*model.onnx"):
        engine.run(feeds())


def test_session_defaults_physical_cores_and_no_spinning(model_path: Path) -> None:
    engine = OnnxRuntimeEngine(model_path)
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == physical_cores() >= 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert OnnxRuntimeEngine(model_path, threads=1).session.get_session_options().intra_op_num_threads == 1


def test_session_is_created_lazily_and_recreated_after_close(model_path: Path) -> None:
    engine = OnnxRuntimeEngine(model_path, threads=1)
    assert engine._session is None and engine.session_path is None
    first = engine.run(feeds())
    engine.close()
    assert engine._session is None
    np.testing.assert_array_equal(engine.run(feeds())["out"], first["out"])


def test_create_engine_applies_the_component_dim_ranges(model_path: Path) -> None:
    component = ComponentInfo("unet", model_path, {}, {"file": "unet/model.onnx", "dims": {"batch": [1, 1]}})
    engine = create_engine(component, provider="cpu", threads=1)
    assert engine.dim_ranges == {"batch": (1, 1)}
    with pytest.raises(InputError, match=r"must be in \[1, 1\]; got 2"):
        engine.run(feeds(batch=2))


# ----- optimised-model cache -----
def test_optimized_model_is_cached_and_reused(model_path: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "ort-cache"
    first = OnnxRuntimeEngine(model_path, threads=1, optimized_model_cache=cache)
    expected = first.run(feeds())
    cached = sorted(cache.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".onnx" and cached[0].stat().st_size > 0
    assert first.session_path == model_path  # optimised from the source this time
    mtime = cached[0].stat().st_mtime_ns

    caplog.set_level("INFO", logger="diffrt.runtime.engines.onnxruntime")
    second = OnnxRuntimeEngine(model_path, threads=1, optimized_model_cache=cache)
    np.testing.assert_allclose(second.run(feeds())["out"], expected["out"], rtol=1e-6, atol=1e-6)
    assert second.session_path == cached[0]
    assert sorted(cache.iterdir()) == cached and cached[0].stat().st_mtime_ns == mtime
    assert "loaded the optimised model" in caplog.text
    assert second.session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    OnnxRuntimeEngine(model_path, threads=1, optimized_model_cache=cache, graph_optimization_level="basic").inputs
    assert len(list(cache.iterdir())) == 2  # another optimisation level is another key


def test_cache_key_follows_the_model_file(tmp_path: Path) -> None:
    path = build_model(tmp_path / "m" / "model.onnx")
    cache = tmp_path / "cache"
    OnnxRuntimeEngine(path, threads=1, optimized_model_cache=cache).inputs
    os.utime(path, ns=(1, 1))  # a re-exported model has another mtime
    OnnxRuntimeEngine(path, threads=1, optimized_model_cache=cache).inputs
    assert len(list(cache.glob("*.onnx"))) == 2


def test_corrupt_cache_entry_is_rebuilt(model_path: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    OnnxRuntimeEngine(model_path, threads=1, optimized_model_cache=cache).inputs
    (entry,) = cache.iterdir()
    entry.write_bytes(b"garbage")
    engine = OnnxRuntimeEngine(model_path, threads=1, optimized_model_cache=cache)
    f = feeds()
    np.testing.assert_allclose(engine.run(f)["out"], (f["x"] + f["y"]) @ weight(), rtol=1e-5, atol=1e-5)
    assert engine.session_path == model_path and entry.stat().st_size > len(b"garbage")


def test_unusable_cache_folder_only_warns(model_path: Path, tmp_path: Path, caplog) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    engine = OnnxRuntimeEngine(model_path, threads=1, optimized_model_cache=not_a_folder)
    f = feeds()
    np.testing.assert_allclose(engine.run(f)["out"], (f["x"] + f["y"]) @ weight(), rtol=1e-5, atol=1e-5)
    assert "could not cache the optimised model" in caplog.text and engine.session_path == model_path


def test_external_data_models_run_and_cache(tmp_path: Path) -> None:
    path = build_model(tmp_path / "unet" / "model.onnx", external_data=True)
    assert (path.parent / "model.onnx_data").is_file()
    cache = tmp_path / "cache"
    f = feeds()
    first = OnnxRuntimeEngine(path, threads=1, optimized_model_cache=cache).run(f)
    np.testing.assert_allclose(first["out"], (f["x"] + f["y"]) @ weight(), rtol=1e-5, atol=1e-5)
    second = OnnxRuntimeEngine(path, threads=1, optimized_model_cache=cache)
    np.testing.assert_allclose(second.run(f)["out"], first["out"], rtol=1e-6, atol=1e-6)
    assert second.session_path is not None and second.session_path.parent == cache
    assert not list(cache.glob(".*.tmp"))  # no temporary files left behind


# ----- concurrency -----
def test_concurrent_runs_share_one_session_and_match_sequential(model_path: Path) -> None:
    engine = OnnxRuntimeEngine(model_path, threads=1)  # fresh: the threads race to create the session
    inputs = [feeds(seed=i) for i in range(4)]
    results: dict[int, dict[str, np.ndarray]] = {}
    sessions: dict[int, ort.InferenceSession] = {}

    def work(i: int) -> None:
        sessions[i] = engine.session  # all four race to create it: the lock must hand out one session
        for _ in range(5):
            results[i] = engine.run(inputs[i])

    assert not run_in_threads(work)
    assert len({id(session) for session in sessions.values()}) == 1 and len(sessions) == 4
    for i, f in enumerate(inputs):
        np.testing.assert_allclose(results[i]["out"], (f["x"] + f["y"]) @ weight(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_provider_runs_with_io_binding(model_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    engine = OnnxRuntimeEngine(model_path, provider="cuda")
    f = feeds()
    out = engine.run(f)
    assert engine.session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(out["out"], (f["x"] + f["y"]) @ weight(), rtol=1e-3, atol=1e-3)
