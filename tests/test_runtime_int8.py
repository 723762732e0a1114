"""int8 on the OpenVINO engine (issue #19): refused without VNNI / AMX, quantized by NNCF, cached, close to fp32.

Oracles: the fp32 OpenVINO result of the same model and feeds (tiny sd15-shaped package: image PSNR; a MatMul model:
max error), and the digits model's classifier accuracy (scripts/digits/quality.py), a real quality signal.
Tests that run int8 skip on CPUs without int8 dot products (AVX2-only CI machines) and without nncf.
"""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_runtime_openvino import PIPE_ARGS, build_model, reference

from diffrt.bench.report import psnr
from diffrt.errors import ConfigError
from diffrt.runtime.engines import create_engine, split_precision
from diffrt.runtime.engines.int8 import INT8_CPU_FLAGS, Calibration, import_nncf, int8_support, require_int8
from diffrt.runtime.engines.openvino import openvino_available

pytest.importorskip("onnx")
ROOT = Path(__file__).resolve().parent.parent
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")
needs_nncf = pytest.mark.skipif(importlib.util.find_spec("nncf") is None,
                                reason="nncf is not installed (pip install 'diffrt[int8]')")
#: weight-only int8 (per-channel) of a 16x16 MatMul: well within a hundredth of outputs of size ~1
WEIGHTS_ONLY_TOL = 2e-2
#: the tiny random-weight sd15 package, 3 steps at 64x64; its bf16 image is held to 30 dB (test_runtime_openvino)
MIN_INT8_PSNR_DB = 25.0


def _int8_here() -> bool:
    if not openvino_available():
        return False
    from diffrt.runtime.engines.openvino import int8_support as engine_support

    return engine_support()[0]


needs_int8 = pytest.mark.skipif(not _int8_here(), reason="this CPU has no VNNI / AMX int8 instructions")


@pytest.fixture(autouse=True)
def int8_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Quantized models go to this test's own cache, never the user's."""
    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino-int8"


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("int8") / "small" / "model.onnx")


# ----- refusal -----
def test_int8_needs_vnni_or_amx_and_says_which_flags_are_missing():
    assert int8_support(frozenset({"avx512_vnni"}), ["FP32", "INT8"])[0]
    assert int8_support(frozenset({"avx_vnni"}), ["FP32", "INT8"])[0]
    assert int8_support(frozenset({"amx_int8"}), ["FP32", "INT8"])[0]
    message = (r"`inference_precision` 'int8' needs a CPU with int8 dot-product instructions \(amx_int8, "
               r"avx512_vnni, avx_vnni: AMX or VNNI\); this one has none of them .*without amx_int8 / avx512_vnni")
    with pytest.raises(ConfigError, match=message):
        require_int8(frozenset({"avx2", "fma", "avx512f"}), ["FP32", "INT8"])
    assert INT8_CPU_FLAGS == ("amx_int8", "avx512_vnni", "avx_vnni")


@needs_openvino
def test_int8_engine_on_an_avx2_only_cpu_is_refused_before_reading_the_model(small_model: Path, monkeypatch):
    from diffrt.runtime.engines import openvino

    # only the CPU-flag reader is replaced: the engine and OpenVINO are the real ones
    monkeypatch.setattr(openvino, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    with pytest.raises(ConfigError, match=r"'int8' needs a CPU with int8 dot-product instructions"):
        openvino.OpenVINOEngine(small_model, inference_precision="int8")
    with pytest.raises(ValueError, match=r"amx_int8, avx512_vnni, avx_vnni"):
        create_engine(small_model, "openvino", inference_precision="int8")


def test_int8_without_nncf_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError
    with pytest.raises(ConfigError, match=r"needs the nncf package .* `pip install 'diffrt\[int8\]'`"):
        import_nncf()


def test_a_precision_suffix_is_split_off_the_provider():
    assert split_precision("openvino:int8") == ("openvino", {"inference_precision": "int8"})
    assert split_precision("openvino") == ("openvino", {})
    with pytest.raises(ConfigError, match=r"precision suffix only on openvino and auto .*got 'cpu:int8'"):
        split_precision("cpu:int8")


# ----- quantized models -----
@needs_openvino
@needs_nncf
@needs_int8
def test_weight_only_int8_stays_close_to_fp32_and_is_cached(small_model: Path, int8_cache: Path):
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    x = np.random.default_rng(0).standard_normal((2, 5, 16), dtype=np.float32)
    engine = OpenVINOEngine(small_model, inference_precision="int8")
    np.testing.assert_allclose(engine.run({"x": x})["out"], reference(x), atol=WEIGHTS_ONLY_TOL, rtol=0)
    assert [p.name for p in int8_cache.glob("*/model.xml")] == ["model.xml"]
    cached = OpenVINOEngine(small_model, inference_precision="int8")
    np.testing.assert_array_equal(cached.run({"x": x})["out"], engine.run({"x": x})["out"])


@needs_openvino
@needs_nncf
@needs_int8
def test_calibrated_int8_is_made_once_and_read_from_the_cache(small_model: Path, int8_cache: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    from diffrt.runtime.engines.openvino import OpenVINOEngine

    rng = np.random.default_rng(1)
    calls = []
    reads: list[Path] = []
    read_source = OpenVINOEngine._read_source

    def counted(engine):  # the real reader, counted
        reads.append(engine.path)
        return read_source(engine)

    monkeypatch.setattr(OpenVINOEngine, "_read_source", counted)

    def feeds():
        calls.append(1)
        return [{"x": rng.standard_normal((2, 5, 16), dtype=np.float32)} for _ in range(4)]

    calibration = Calibration("four random batches", feeds)
    first = OpenVINOEngine(small_model, inference_precision="int8", calibration=calibration, static_shapes=True)
    x = np.random.default_rng(2).standard_normal((2, 5, 16), dtype=np.float32)
    out = first.run({"x": x})["out"]
    second = OpenVINOEngine(small_model, inference_precision="int8", calibration=calibration, static_shapes=True)
    np.testing.assert_array_equal(second.run({"x": x})["out"], out)
    assert len(calls) == 1  # the second engine read the cached model
    assert reads == [small_model]  # ... and not the float model: only the first engine read it
    other = Calibration("other batches", feeds)
    OpenVINOEngine(small_model, inference_precision="int8", calibration=other).run({"x": x})
    assert len(calls) == 2 and len(list(int8_cache.glob("*/model.xml"))) == 2  # keyed by the calibration too


@needs_openvino
@needs_int8
def test_int8_is_refused_with_replaced_initializers(small_model: Path):
    from test_runtime_openvino import weight

    with pytest.raises(ConfigError, match=r"'int8' cannot be combined with replaced initializers \(LoRA\)"):
        create_engine(small_model, "openvino", inference_precision="int8", initializers={"W": weight()})


@needs_openvino
@needs_nncf
@needs_int8
def test_int8_pipeline_quantizes_the_unet_only_and_stays_close_to_fp32(tiny_package, record_property):
    from diffrt.runtime import DiffusionPipeline

    root = tiny_package("sd15")
    fp32 = DiffusionPipeline.from_pretrained(root, provider="openvino")(generator=0, **PIPE_ARGS).images
    pipe = DiffusionPipeline.from_pretrained(root, provider="openvino", inference_precision="int8")
    image = pipe(generator=0, **PIPE_ARGS).images
    assert pipe.engine("unet").inference_precision == "int8"
    assert pipe.engine("unet").calibration is not None  # hybrid: calibrated on the pipeline's own UNet feeds
    assert pipe.engine("vae_decoder").inference_precision in ("bf16", "fp32")
    db = psnr(image, fp32, peak=1.0)
    record_property("int8_psnr_db", db)
    logging.getLogger(__name__).warning("int8 image PSNR vs fp32: %.1f dB, max |diff| %.3f", db,
                                        np.abs(image - fp32).max())
    assert db >= MIN_INT8_PSNR_DB


@needs_openvino
@needs_nncf
@needs_int8
def test_int8_digits_are_recognised_within_one_image_of_fp32():
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "scripts"))
    from digits import quality

    from diffrt.runtime import DiffusionPipeline
    from diffrt.runtime.builtin import resolve_builtin

    oracle = quality.fit_oracle()
    scores = {}
    for precision in ("fp32", "int8"):
        pipe = DiffusionPipeline.from_pretrained(resolve_builtin("digits"), provider="openvino", threads=1,
                                                 inference_precision=precision, static_shapes=True)
        pipe.set_progress_bar_config(disable=True)
        scores[precision] = quality.accuracy(oracle, quality.generate(pipe, num_inference_steps=20))
    # 80 images: one image is 1.25 points
    assert scores["int8"] >= scores["fp32"] - 1 / 80, scores


@needs_openvino
@needs_nncf
@needs_int8
def test_quantizing_does_not_import_torch(small_model: Path, tmp_path: Path):
    # NNCF imports torch wherever it is installed; the runtime must not (diffrt.runtime is torch-free)
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from diffrt.runtime.engines.openvino import OpenVINOEngine
        engine = OpenVINOEngine({str(small_model)!r}, inference_precision="int8",
                                optimized_model_cache={str(tmp_path)!r})
        engine.run({{"x": np.ones((1, 2, 16), np.float32)}})
        assert "nncf" in sys.modules and "torch" not in sys.modules, "torch was imported"
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
