"""OpenVINO engine and `provider="auto"`: real OpenVINO compilations, checked against ONNX Runtime fp32.

Oracle: ONNX Runtime's CPU provider on the same ONNX files (itself checked against torch / Diffusers elsewhere).
Tolerances: fp32 outputs within 1e-4 (absolute and relative) of ONNX Runtime; bf16 images >= 30 dB PSNR against
the fp32 image. The tiny sd15 package is the shared session fixture; small graphs are built here.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from onnx_builders import save_graph

from diffrt.bench.report import psnr
from diffrt.errors import ConfigError, EngineError, InputError
from diffrt.package.reader import ModelPackage
from diffrt.runtime.engines import TensorSpec, check_provider, create_engine
from diffrt.runtime.engines.openvino import bf16_support, openvino_available

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

needs_openvino = pytest.mark.skipif(
    not openvino_available(), reason="openvino is not installed (pip install 'diffrt[openvino]')"
)
FP32_TOL = 1e-4
MIN_BF16_PSNR_DB = 30.0
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
HIDDEN = 16
PIPE_ARGS = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64, output_type="np")


def _bf16_here() -> bool:
    return openvino_available() and bf16_support()[0]


def build_model(path: Path) -> Path:
    """out = relu(x @ W) with x [batch, n, 16] float32: compiles in milliseconds."""
    from onnx import TensorProto, helper, numpy_helper

    return save_graph(
        path,
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["out"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n", HIDDEN])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "n", HIDDEN])],
        [numpy_helper.from_array(weight(), "W")],
        "matmul_relu",
    )


def weight() -> np.ndarray:
    return ((np.arange(HIDDEN * HIDDEN, dtype=np.float32).reshape(HIDDEN, HIDDEN) % 5) - 2) / 4


def reference(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ weight(), 0)


def component_feeds(name: str, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if name == "text_encoder":
        return {"input_ids": rng.integers(0, 300, (batch, 77)).astype(np.int32)}
    if name == "unet":
        return {
            "sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32),
            "timestep": np.full((batch,), 500 + seed, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
        }
    if name == "vae_decoder":
        return {"latent_sample": rng.standard_normal((batch, 4, 8, 8), dtype=np.float32)}
    return {"sample": rng.uniform(-1, 1, (batch, 3, 64, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def package(tiny_package) -> ModelPackage:
    return ModelPackage.open(tiny_package("sd15"))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("openvino") / "small" / "model.onnx")


@pytest.fixture(scope="module")
def ort_image(package: ModelPackage) -> np.ndarray:
    from diffrt.runtime import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(package.root, provider="cpu")
    return pipe(generator=0, **PIPE_ARGS).images


# ----- parity with ONNX Runtime -----
@needs_openvino
@pytest.mark.parametrize("static_shapes", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", COMPONENTS)
def test_fp32_components_match_onnxruntime(package: ModelPackage, name: str, static_shapes: bool) -> None:
    component = package.component(name)
    feeds = component_feeds(name)
    expected = create_engine(component, "cpu").run(feeds)
    got = create_engine(component, "openvino", static_shapes=static_shapes).run(feeds)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=FP32_TOL, rtol=FP32_TOL, err_msg=f"{name}.{key}")


@needs_openvino
def test_engine_specs_are_the_manifest_specs(package: ModelPackage) -> None:
    component = package.component("unet")
    engine = create_engine(component, "openvino")
    # OpenVINO drops the ONNX dim names; the engine takes them from the manifest so named dims are checked together
    assert engine.inputs == component.inputs
    assert engine.outputs == component.outputs


@needs_openvino
def test_fp32_pipeline_image_matches_onnxruntime(package: ModelPackage, ort_image: np.ndarray) -> None:
    from diffrt.runtime import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(package.root, provider="openvino")
    image = pipe(generator=0, **PIPE_ARGS).images
    assert image.shape == ort_image.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(image, ort_image, atol=FP32_TOL, rtol=0)


@needs_openvino
@pytest.mark.skipif(not _bf16_here(), reason="this CPU has no avx512_bf16 / AMX, so OpenVINO cannot run bf16 here")
def test_bf16_pipeline_image_is_within_30_db_of_fp32(package: ModelPackage, ort_image: np.ndarray,
                                                     record_property) -> None:
    from diffrt.runtime import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(package.root, provider="openvino", inference_precision="bf16")
    image = pipe(generator=0, **PIPE_ARGS).images
    db = psnr(image, ort_image, peak=1.0)
    record_property("bf16_psnr_db", db)
    logging.getLogger(__name__).warning("bf16 image PSNR vs fp32: %.1f dB", db)
    assert db >= MIN_BF16_PSNR_DB


@needs_openvino
def test_the_command_lines_precision_suffix_works_in_python_too(package: ModelPackage) -> None:
    from diffrt.errors import InputError
    from diffrt.runtime import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(package.root, provider="openvino:fp32")
    assert pipe.provider == "openvino" and pipe.engine_options["inference_precision"] == "fp32"
    assert pipe.engine("unet").inference_precision == "fp32"
    with pytest.raises(InputError, match=r"`inference_precision` 'bf16' contradicts `provider` 'openvino:fp32'"):
        DiffusionPipeline.from_pretrained(package.root, provider="openvino:fp32", inference_precision="bf16")


# ----- provider="auto" -----
@needs_openvino
def test_auto_picks_openvino_with_the_cpus_precision_and_static_shapes(package: ModelPackage) -> None:
    engine = create_engine(package.component("unet"), "auto")
    assert type(engine).__name__ == "OpenVINOEngine"
    assert engine.inference_precision == ("bf16" if bf16_support()[0] else "fp32")
    assert engine.static_shapes
    check_provider("auto")


def test_auto_falls_back_to_onnxruntime_without_openvino(small_model: Path) -> None:
    # A child process where `import openvino` fails, as on a machine without the extra.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["openvino"] = None
        import numpy as np
        from diffrt.runtime.engines import create_engine, check_provider
        engine = create_engine({str(small_model)!r}, "auto", inference_precision="auto")
        print(type(engine).__name__)
        print(engine.run({{"x": np.ones((1, 2, {HIDDEN}), np.float32)}})["out"].shape)
        try:
            check_provider("openvino")
        except ValueError as error:
            print(type(error).__name__, error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "OnnxRuntimeEngine"
    assert lines[1] == f"(1, 2, {HIDDEN})"
    assert lines[2].startswith("ConfigError `provider` 'openvino' needs the openvino package")
    assert "pip install 'diffrt[openvino]'" in lines[2]


# ----- static shapes -----
@needs_openvino
def test_static_shapes_compile_once_per_shape_and_keep_the_most_recent(small_model: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    engine = OpenVINOEngine(small_model, static_shapes=True, static_cache_size=2, threads=1)
    rng = np.random.default_rng(0)
    shapes = [(1, 3), (1, 3), (2, 5), (1, 3), (4, 1), (2, 5), (1, 3)]
    # (1,3) new; hit; (2,5) new; hit; (4,1) new, drops (2,5); (2,5) new, drops (1,3); (1,3) new
    expected_compilations = [1, 1, 2, 2, 3, 4, 5]
    for shape, count in zip(shapes, expected_compilations):
        x = rng.standard_normal((*shape, HIDDEN), dtype=np.float32)
        np.testing.assert_allclose(engine.run({"x": x})["out"], reference(x), rtol=1e-5, atol=1e-5)
        assert engine.compilations == count, f"after shape {shape}"


@needs_openvino
def test_dynamic_shapes_compile_once_for_all_shapes(small_model: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    engine = OpenVINOEngine(small_model, threads=1)
    for batch, n in [(1, 3), (2, 5), (4, 1)]:
        x = np.full((batch, n, HIDDEN), 0.5, np.float32)
        np.testing.assert_allclose(engine.run({"x": x})["out"], reference(x), rtol=1e-5, atol=1e-5)
    assert engine.compilations == 1


@needs_openvino
def test_compiled_models_are_cached_on_disk(small_model: Path, tmp_path: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    x = np.linspace(-1, 1, 3 * HIDDEN, dtype=np.float32).reshape(1, 3, HIDDEN)
    first = OpenVINOEngine(small_model, optimized_model_cache=tmp_path / "cache").run({"x": x})["out"]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached, "OpenVINO wrote nothing into CACHE_DIR"
    second = OpenVINOEngine(small_model, optimized_model_cache=tmp_path / "cache").run({"x": x})["out"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # reused, not compiled anew
    np.testing.assert_array_equal(first, second)


@needs_openvino
@pytest.mark.skipif(not _bf16_here(), reason="this CPU has no avx512_bf16 / AMX, so OpenVINO cannot run bf16 here")
def test_one_cache_serves_fp32_and_bf16_engines_each_its_own_compiled_model(small_model: Path, tmp_path: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    # OpenVINO's cache key leaves the precision hint out: an fp32 blob was imported by a later bf16 engine (and
    # ran as bf16: an sd15 image went from 45 dB to 30 dB, or NaN). Oracle: each precision without any cache.
    x = np.linspace(-1, 1, 3 * HIDDEN, dtype=np.float32).reshape(1, 3, HIDDEN)
    expected = {p: OpenVINOEngine(small_model, inference_precision=p).run({"x": x})["out"] for p in ("fp32", "bf16")}
    assert not np.array_equal(expected["fp32"], expected["bf16"])  # else this test could not tell them apart
    cache = tmp_path / "cache"
    for order in (("fp32", "bf16"), ("bf16", "fp32")):
        shutil.rmtree(cache, ignore_errors=True)
        for precision in order + order:  # each compiled once, then read from the cache
            got = OpenVINOEngine(small_model, inference_precision=precision, optimized_model_cache=cache)
            np.testing.assert_array_equal(got.run({"x": x})["out"], expected[precision], err_msg=f"{order} {precision}")
        # one compiled model per precision (a tiny MatMul happens to run right from the other's blob; an sd15 UNet
        # did not), each written once
        assert len(list(cache.rglob("*.blob"))) == 2


# ----- memory (issue #19) -----
MAPPED = 1024  # a [1024, 1024] fp32 weight: 4 MiB of external data, far above a few pages of noise
MiB = 1 << 20
needs_smaps = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")


def build_external_model(folder: Path) -> Path:
    """out = x @ W with W in `model.onnx_data` beside it, which OpenVINO memory-maps."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((MAPPED, MAPPED)).astype(np.float32)
    return save_graph(
        folder / "model.onnx",
        [helper.make_node("MatMul", ["x", "W"], ["out"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", MAPPED])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", MAPPED])],
        [numpy_helper.from_array(w, "W")],
        "external_matmul",
        external_data=True,
    )


@needs_openvino
@needs_smaps
@pytest.mark.parametrize("cached", [False, True], ids=["compiled", "cache-hit"])
def test_mapped_weights_leave_the_resident_set_after_compiling_with_the_same_results(tmp_path: Path,
                                                                                     cached: bool) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine
    from diffrt.runtime.engines.residency import resident_bytes

    x = np.random.default_rng(1).standard_normal((2, MAPPED), dtype=np.float32)
    results, resident = {}, {}
    for trim in (False, True):
        folder = tmp_path / f"trim-{trim}"  # apart, so one engine's trimming cannot touch the other's files
        path, cache = build_external_model(folder / "unet"), (folder / "cache" if cached else None)
        if cached:  # a first start fills the cache; the measured engine imports its blob (mapped as well)
            OpenVINOEngine(path, threads=1, optimized_model_cache=cache).close()
            OpenVINOEngine(path, threads=1, optimized_model_cache=cache).run({"x": x})
            assert any(cache.iterdir())
        engine = OpenVINOEngine(path, threads=1, optimized_model_cache=cache, trim_mapped_weights=trim)
        results[trim] = [engine.run({"x": x})["out"] for _ in range(2)]
        resident[trim] = resident_bytes([folder])
    # Without trimming the compile left the whole weight file resident (and the blob on a cache hit); with it,
    # neither compiling nor running keeps any of it.
    assert resident[False] >= MAPPED * MAPPED * 4 * (2 if cached else 1) - MiB
    assert resident[True] < MiB
    for got in results[True] + results[False][1:]:
        np.testing.assert_array_equal(got, results[False][0])


@needs_openvino
@needs_smaps
def test_weights_inside_the_onnx_file_are_read_from_an_ir_copy_in_the_cache(package: ModelPackage, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from diffrt.runtime.engines import openvino as ov_engine
    from diffrt.runtime.engines.residency import shared_readonly_mappings

    # The tiny text encoder's weights are inside its model.onnx, as a real one's are (only smaller than the cutoff).
    monkeypatch.setattr(ov_engine, "INLINE_WEIGHTS_BYTES", 0)
    component, feeds = package.component("text_encoder"), component_feeds("text_encoder")
    expected = create_engine(component, "openvino").run(feeds)  # no cache: read from the ONNX file
    cache = tmp_path / "cache"
    first = create_engine(component, "openvino", optimized_model_cache=cache)
    assert first.inputs == component.inputs and first.outputs == component.outputs
    copies = sorted(cache.glob("openvino-ir-text_encoder-model-*"))
    assert [sorted(f.name for f in copy.iterdir()) for copy in copies] == [["model.bin", "model.xml"]]
    later = create_engine(component, "openvino", optimized_model_cache=cache)  # reads the copy
    for engine in (first, later):
        got = engine.run(feeds)
        assert set(got) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    # its weights are a mapped file now (trimmable), not a heap copy
    assert str(copies[0] / "model.bin") in {m.path for m in shared_readonly_mappings([cache])}
    assert sorted(cache.glob("openvino-ir-*")) == copies  # reused, not written again


@needs_openvino
def test_small_onnx_files_get_no_ir_copy(small_model: Path, tmp_path: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    x = np.full((1, 3, HIDDEN), 0.5, np.float32)
    engine = OpenVINOEngine(small_model, optimized_model_cache=tmp_path / "cache", threads=1)
    np.testing.assert_allclose(engine.run({"x": x})["out"], reference(x), rtol=1e-5, atol=1e-5)
    assert not list((tmp_path / "cache").glob("openvino-ir-*"))


# ----- threads -----
@needs_openvino
@pytest.mark.parametrize("static_shapes", [False, True], ids=["dynamic", "static"])
def test_four_threads_give_the_sequential_results(package: ModelPackage, static_shapes: bool) -> None:
    engine = create_engine(package.component("unet"), "openvino", static_shapes=static_shapes)
    feeds = [component_feeds("unet", seed=seed, batch=1 + seed % 2) for seed in range(12)]
    sequential = [engine.run(f)["out_sample"] for f in feeds]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda f: engine.run(f)["out_sample"], feeds))
    for seq, con in zip(sequential, concurrent):
        np.testing.assert_array_equal(con, seq)


# ----- errors -----
@needs_openvino
def test_unknown_precision_is_a_value_error_naming_the_option(small_model: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    message = r"`inference_precision` must be one of 'fp32', 'bf16', 'int8', 'auto'; got 'fp16'"
    with pytest.raises(ConfigError, match=message):
        OpenVINOEngine(small_model, inference_precision="fp16")
    assert issubclass(ConfigError, ValueError)


@needs_openvino
@pytest.mark.skipif(_bf16_here(), reason="this CPU supports bf16, so asking for it is no error")
def test_bf16_on_a_cpu_without_it_is_a_clear_error(small_model: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    with pytest.raises(ConfigError, match=r"`inference_precision` 'bf16' needs a CPU with avx512_bf16 or amx_bf16"):
        OpenVINOEngine(small_model, inference_precision="bf16")
    # The pipeline layer hands the option to every engine; the first engine built reports it.
    with pytest.raises(ValueError, match="inference_precision"):
        create_engine(small_model, "openvino", inference_precision="bf16")


@needs_openvino
def test_options_of_another_engine_are_rejected_by_name(small_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"`graph_optimization_level` is not an option of provider 'openvino'"):
        create_engine(small_model, "openvino", graph_optimization_level="all")
    with pytest.raises(ConfigError, match=r"`static_shapes` is not an option of provider 'cpu'"):
        create_engine(small_model, "cpu", static_shapes=True)


@needs_openvino
@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"threads": 0}, r"`threads` must be None or an integer >= 1; got 0"),
        ({"static_shapes": "yes"}, r"`static_shapes` must be True or False; got 'yes'"),
        ({"static_cache_size": 0}, r"`static_cache_size` must be an integer >= 1; got 0"),
        ({"trim_mapped_weights": "yes"}, r"`trim_mapped_weights` must be True or False; got 'yes'"),
    ],
)
def test_bad_engine_options_are_value_errors(small_model: Path, options: dict, pattern: str) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    with pytest.raises(ValueError, match=pattern):
        OpenVINOEngine(small_model, **options)


@needs_openvino
def test_a_manifest_that_disagrees_with_the_model_is_an_engine_error(small_model: Path) -> None:
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    wrong = [TensorSpec("x", np.float16, ("batch", "n", HIDDEN))]
    with pytest.raises(EngineError, match=r"the manifest declares `x` as float16 \[batch, n, 16\] but the model has "
                                          r"float32 \[\?, \?, 16\]"):
        _ = OpenVINOEngine(small_model, input_specs=wrong).inputs
    renamed = [TensorSpec("y", np.float32, ("batch", "n", HIDDEN))]
    with pytest.raises(EngineError, match=r"the manifest's inputs \['y'\] differ from the model's \['x'\]"):
        _ = OpenVINOEngine(small_model, input_specs=renamed).inputs


@needs_openvino
def test_feeds_are_checked_against_the_manifest_before_running(package: ModelPackage) -> None:
    engine = create_engine(package.component("unet"), "openvino", static_shapes=True)
    feeds = component_feeds("unet")
    short = dict(feeds, encoder_hidden_states=feeds["encoder_hidden_states"][:, :10])
    low, high = package.component("unet").dim_ranges["sequence"]
    with pytest.raises(InputError, match=rf"`encoder_hidden_states` dimension 1 \('sequence'\) must be in "
                                         rf"\[{low}, {high}\]"):
        engine.run(short)
    with pytest.raises(InputError, match=r"`timestep` dimension 0 \('batch'\) must equal 2 as in `sample`"):
        engine.run(dict(feeds, timestep=feeds["timestep"][:1]))
    assert engine.compilations == 0  # rejected before any compilation
