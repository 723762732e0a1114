"""The CUDA engine's parts that run without a GPU: `DeviceIO` bookkeeping on ONNX Runtime's CPU provider (the same
code the CUDA engine runs, with device "cpu"), the CUDA options and their errors, and provider "auto" here.

The CUDA side itself (device buffers, CUDA graphs, image parity) is tests/test_onnxruntime_cuda_gpu.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from concurrency import run_in_threads
from test_runtime_engines import build_model, feeds, weight

from diffrt.errors import ConfigError
from diffrt.runtime.engines import OnnxRuntimeEngine, auto_provider, create_engine
from diffrt.runtime.engines.onnxruntime_cuda import CudaOptions, DeviceIO, cuda_device_count, cuda_usable


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    path = build_model(tmp_path_factory.mktemp("cuda_io") / "model.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def expected(f: dict[str, np.ndarray]) -> np.ndarray:
    return (f["x"] + f["y"]) @ weight()


def test_device_io_gives_the_session_outputs_and_uploads_only_changed_inputs(session):
    io = DeviceIO(session, ["out", "t_out"], device="cpu")
    first = feeds(seed=0)
    out, t_out = io.run(first)
    np.testing.assert_allclose(out, expected(first), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t_out, first["t"])
    assert io.last_upload_bytes == sum(a.nbytes for a in first.values())
    # A denoising step: new latents (x), the same conditioning (y) and timestep (t): only x moves.
    step = dict(first, x=feeds(seed=1)["x"])
    out_2, _ = io.run(step)
    assert io.last_upload_bytes == step["x"].nbytes
    np.testing.assert_allclose(out_2, expected(step), rtol=1e-5, atol=1e-5)
    # The same values in a new array object are still not copied; a changed value in place is.
    io.run({name: array.copy() for name, array in step.items()})
    assert io.last_upload_bytes == 0
    step["y"][0, 0, 0] += 1.0
    out_3, _ = io.run(step)
    assert io.last_upload_bytes == step["y"].nbytes
    np.testing.assert_allclose(out_3, expected(step), rtol=1e-5, atol=1e-5)


def test_device_io_results_stay_valid_after_later_runs(session):
    # The output buffers are fixed per shape and overwritten by the next run: returned arrays must not alias them.
    io = DeviceIO(session, ["out", "t_out"], device="cpu")
    a, b = feeds(seed=2), feeds(seed=3)
    out_a, _ = io.run(a)
    kept = out_a.copy()
    io.run(b)
    io.run(b)
    np.testing.assert_array_equal(out_a, kept)


def test_device_io_keeps_one_slot_per_input_shape(session):
    io = DeviceIO(session, ["out", "t_out"], device="cpu", max_slots=2)
    for batch, n in [(1, 3), (2, 5), (1, 3), (3, 2)]:
        f = feeds(batch=batch, n=n, seed=batch * 10 + n)
        out, _ = io.run(f)
        assert out.shape == (batch, n, 32)
        np.testing.assert_allclose(out, expected(f), rtol=1e-5, atol=1e-5)
    assert len(io._free) <= 2  # the least recently used shape was dropped beyond max_slots


def test_device_io_serves_concurrent_threads_with_their_own_buffers(session):
    io = DeviceIO(session, ["out", "t_out"], device="cpu")
    inputs = [feeds(seed=10 + i) for i in range(4)]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(4)}

    def work(i: int) -> None:
        for _ in range(20):
            results[i].append(io.run(inputs[i])[0])

    assert not run_in_threads(work)
    for i in range(4):
        for out in results[i]:
            np.testing.assert_allclose(out, expected(inputs[i]), rtol=1e-5, atol=1e-5)


def test_cuda_options_map_to_onnxruntime_names():
    options = CudaOptions(device_id=1, prefer_nhwc=True, conv_algo_search="heuristic", tf32=True,
                          gpu_memory_limit_mb=2048, arena_growth="power_of_two").provider_options(graphs=True)
    assert options == {
        "device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1", "prefer_nhwc": "1", "use_tf32": "1",
        "arena_extend_strategy": "kNextPowerOfTwo", "enable_cuda_graph": "1", "gpu_mem_limit": str(2048 * 2**20),
    }
    defaults = CudaOptions().provider_options(graphs=False)
    assert defaults["use_tf32"] == "0" and defaults["arena_extend_strategy"] == "kSameAsRequested"
    assert defaults["enable_cuda_graph"] == "0" and "gpu_mem_limit" not in defaults


@pytest.mark.parametrize(("options", "message"), [
    ({"device_id": -1}, r"`device_id` must be an integer >= 0; got -1"),
    ({"cuda_graph": "yes"}, r"`cuda_graph` must be True, False or 'auto'; got 'yes'"),
    ({"prefer_nhwc": 1}, r"`prefer_nhwc` must be True or False; got 1"),
    ({"conv_algo_search": "fast"}, r"`conv_algo_search` must be one of exhaustive, heuristic, default; got 'fast'"),
    ({"gpu_memory_limit_mb": 0}, r"`gpu_memory_limit_mb` must be None or an integer >= 1; got 0"),
    ({"arena_growth": "double"}, r"`arena_growth` must be one of requested, power_of_two; got 'double'"),
])
def test_cuda_options_are_checked_with_their_names(options, message):
    with pytest.raises(ConfigError, match=message):
        CudaOptions(**options)


def test_a_cuda_option_with_the_cpu_provider_is_named(tmp_path: Path):
    path = build_model(tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match=r"`cuda_graph` is an option of provider 'cuda'.*CPUExecutionProvider"):
        OnnxRuntimeEngine(path, cuda_graph=True)
    with pytest.raises(ConfigError, match=r"`cuda_graf` is not an option of provider 'cpu'.*cuda_graph"):
        create_engine(path, provider="cpu", cuda_graf=True)
    # The defaults are accepted anywhere: a pipeline passes its options to every component's engine.
    engine = create_engine(path, provider="cpu", cuda_graph=False)
    np.testing.assert_allclose(engine.run(feeds())["out"], expected(feeds()), rtol=1e-5, atol=1e-5)
    assert engine.last_transfer_seconds is None


@pytest.mark.skipif(cuda_usable(), reason="this machine has CUDA")
def test_auto_picks_a_cpu_engine_without_a_gpu():
    assert cuda_device_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers()
    assert auto_provider() in ("openvino", "cpu")


def test_read_only_inputs_are_recognised_by_identity(session):
    io = DeviceIO(session, ["out", "t_out"], device="cpu")
    conditioning = feeds(seed=4)["y"]
    conditioning.flags.writeable = False  # what the denoising loop passes: a read-only copy it owns
    first = dict(feeds(seed=5), y=conditioning)
    io.run(first)
    second = dict(first, x=feeds(seed=6)["x"])
    out, _ = io.run(second)
    assert io.last_upload_bytes == second["x"].nbytes
    np.testing.assert_allclose(out, expected(second), rtol=1e-5, atol=1e-5)
    other = feeds(seed=7)["y"]  # another object with other values is uploaded
    other.flags.writeable = False
    out, _ = io.run(dict(second, y=other))
    assert io.last_upload_bytes == other.nbytes
    np.testing.assert_allclose(out, expected(dict(second, y=other)), rtol=1e-5, atol=1e-5)


def test_cuda_graph_applies_to_the_unet_only(tmp_path: Path):
    from diffrt.package.reader import ComponentInfo

    path = build_model(tmp_path / "model.onnx")
    # A text encoder or VAE is built without the option (it runs once per image) ...
    engine = create_engine(ComponentInfo("text_encoder", path), provider="cpu", cuda_graph=True)
    np.testing.assert_allclose(engine.run(feeds())["out"], expected(feeds()), rtol=1e-5, atol=1e-5)
    # ... while the UNet's engine gets it, here refused with the provider that cannot use it.
    with pytest.raises(ConfigError, match=r"`cuda_graph` is an option of provider 'cuda'"):
        create_engine(ComponentInfo("unet", path), provider="cpu", cuda_graph=True)
