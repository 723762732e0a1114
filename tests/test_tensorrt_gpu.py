"""Native TensorRT on a GPU: tiny SD 1.5 engines built, run by provider "trt", compared with ONNX Runtime CPU fp32.

Tolerances: fp32 engines within 1e-2 max abs diff of ONNX Runtime on [0, 1] images (TensorRT's kernels sum in
another order); fp16 engines at least 35 dB PSNR against the fp32 images; CUDA graphs bit-identical to plain runs.
(The Philox generator vs `torch.randn` on CUDA is tests/test_rng.py's.)
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from diffrt.bench.report import psnr
from diffrt.errors import EngineError, InputError

pytestmark = pytest.mark.gpu
# TensorRT's libraries come from NVIDIA's own package index only (../shared/gpu.md): where they are not installed,
# a GPU run skips this module instead of failing at the first import.
pytest.importorskip("tensorrt", reason="TensorRT is not installed (its libraries come from pypi.nvidia.com only)")

CALL = dict(prompt="a red square on a blue sky", num_inference_steps=4, height=64, width=64, guidance_scale=7.5,
            output_type="np")


def export(checkpoint: Path, output: Path, precision: str) -> Path:
    from diffrt.export import export_pipeline

    return export_pipeline(checkpoint, output, target="tensorrt", precision=precision, validate=False)


@pytest.fixture(scope="module")
def fp32_package(tiny_checkpoint, tmp_path_factory) -> Path:
    from diffrt.export.tensorrt import build_engines

    package = export(tiny_checkpoint("sd15"), tmp_path_factory.mktemp("trt_gpu") / "fp32", "fp32")
    build_engines(package, precision="fp32", static=(1, 64, 64))
    return package


@pytest.fixture(scope="module")
def fp16_package(tiny_checkpoint, tmp_path_factory) -> Path:
    from diffrt.export.tensorrt import build_engines

    package = export(tiny_checkpoint("sd15"), tmp_path_factory.mktemp("trt_gpu") / "fp16", "fp16")
    build_engines(package, static=(1, 64, 64))  # precision: the package's fp16, strongly typed
    return package


def images(package: Path, provider: str, **options) -> np.ndarray:
    from diffrt.runtime.pipelines.base import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(package, provider=provider, **options)
    return np.asarray(pipe(generator=0, **CALL).images)


def unet_feeds(package: Path, batch: int, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    from diffrt.package.reader import ModelPackage

    unet = ModelPackage.open(package).component("unet")
    context = unet.inputs[2].shape[2]
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, side, side), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, context), dtype=np.float32)}


def engine(package: Path, provider: str, name: str = "unet", **options):
    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.engines import create_engine

    return create_engine(ModelPackage.open(package).component(name), provider=provider, **options)


def test_build_writes_a_plan_and_record_per_component_for_this_gpu(fp32_package):
    from diffrt.runtime.engines.tensorrt import this_platform

    here = this_platform()
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        (record_path,) = (fp32_package / name / "engines").glob("*.json")
        record = json.loads(record_path.read_text())
        assert record_path.with_suffix(".plan").stat().st_size == record["build"]["plan_bytes"] > 0
        assert (record["gpu"], record["sm"], record["tensorrt"]) == (here.gpu, here.sm, here.tensorrt)
        assert record["precision"] == "fp32" and record["strongly_typed"] is False


def test_fp32_engine_images_match_onnxruntime_cpu(fp32_package):
    reference = images(fp32_package, "cpu")
    got = images(fp32_package, "trt")
    assert got.shape == reference.shape == (1, 64, 64, 3)
    assert np.abs(got - reference).max() <= 1e-2


def test_fp16_engine_images_reach_35_db_against_fp32(fp32_package, fp16_package):
    reference = images(fp32_package, "cpu")
    got = images(fp16_package, "trt")
    assert psnr(reference, got, peak=1.0) >= 35.0


def test_cuda_graphs_give_identical_images(fp32_package):
    plain = images(fp32_package, "trt")
    graphed = images(fp32_package, "trt", cuda_graph=True)  # first call per shape captures, later steps replay
    np.testing.assert_array_equal(graphed, plain)


def test_rebuilding_with_the_same_arguments_keeps_the_engine(fp32_package):
    from diffrt.export.tensorrt import build_engines

    plan = next((fp32_package / "unet" / "engines").glob("*.plan"))
    before = plan.stat().st_mtime_ns
    (record,) = build_engines(fp32_package, components=["unet"], precision="fp32", static=(1, 64, 64))
    assert plan.stat().st_mtime_ns == before and record["key"] == plan.stem


def test_dynamic_and_static_engines_side_by_side_serve_their_shapes(fp32_package, tmp_path):
    from diffrt.export.tensorrt import build_engines

    package = tmp_path / "pkg"
    shutil.copytree(fp32_package, package)
    cache = tmp_path / "timing.cache"
    build_engines(package, components=["unet"], precision="fp32", min_size=32, opt_size=64, max_size=96,
                  batch=(1, 1, 2), timing_cache=cache)
    assert cache.stat().st_size > 0
    trt_unet, ort_unet = engine(package, "trt"), engine(package, "cpu")
    for batch, side in ((2, 8), (1, 12), (4, 4)):
        feeds = unet_feeds(package, batch, side)
        got, expected = trt_unet.run(feeds)["out_sample"], ort_unet.run(feeds)["out_sample"]
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    with pytest.raises(InputError, match=r"outside every TensorRT profile built for it"):
        trt_unet.run(unet_feeds(package, 2, 16))
    trt_unet.close()


def test_the_context_pool_serves_concurrent_callers(fp32_package):
    unet = engine(fp32_package, "trt", max_contexts=2, cuda_graph=True)
    feeds = [unet_feeds(fp32_package, 2, 8, seed) for seed in range(6)]
    expected = [unet.run(f)["out_sample"] for f in feeds]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            for _ in range(3):
                results[index] = unet.run(feeds[index])["out_sample"]
        except BaseException as error:  # reported below: a thread's exception would vanish otherwise
            errors.append(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index, value in enumerate(expected):
        np.testing.assert_allclose(results[index], value, atol=1e-6, rtol=0)
    unet.close()


def test_a_tampered_record_is_refused_before_deserializing(fp32_package, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(fp32_package, package)
    for record_path in (package / "unet" / "engines").glob("*.json"):
        record = json.loads(record_path.read_text())
        record["gpu"], record["tensorrt"] = "NVIDIA Imaginary GPU", "9.9.9"
        record_path.write_text(json.dumps(record))
        record_path.with_suffix(".plan").write_bytes(b"not a plan")  # never read: the record check comes first
    with pytest.raises(EngineError) as error:
        engine(package, "trt")
    message = str(error.value)
    assert "gpu 'NVIDIA Imaginary GPU' (record)" in message and "tensorrt '9.9.9' (record)" in message
    assert f"diffrt build-engines {package} --rebuild" in message


def test_a_corrupt_plan_is_a_null_engine_error(fp32_package, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(fp32_package, package)
    for plan in (package / "vae_decoder" / "engines").glob("*.plan"):
        plan.write_bytes(plan.read_bytes()[:1000])
    decoder = engine(package, "trt", name="vae_decoder")
    with pytest.raises(EngineError, match="could not deserialize"):
        decoder.run({"latent_sample": np.zeros((1, 4, 8, 8), np.float32)})


@pytest.fixture(scope="module")
def refit_package(tiny_checkpoint, tmp_path_factory) -> Path:
    from diffrt.export.tensorrt import build_engines

    package = export(tiny_checkpoint("sd15"), tmp_path_factory.mktemp("trt_gpu") / "refit", "fp32")
    build_engines(package, precision="fp32", static=(1, 64, 64), refit=True)
    return package


def test_a_lora_refits_the_engines_like_onnxruntime_applies_it_and_unloading_restores_the_plan(
        refit_package, fp32_package, tiny_checkpoint, tmp_path):
    """Issue #15: the same LoRA through TensorRT refit and through ONNX Runtime's initializer overrides; a switch
    of weights refits again; unloading gives the plain plan's image exactly; non-refittable plans are refused."""
    from lora_files import peft_lora

    from diffrt.errors import ConfigError
    from diffrt.runtime.pipelines.base import DiffusionPipeline

    lora = peft_lora(tiny_checkpoint("sd15"), "sd15", tmp_path / "lora", seed=3)
    pipes = {provider: DiffusionPipeline.from_pretrained(refit_package, provider=provider)
             for provider in ("trt", "cpu")}
    base = np.asarray(pipes["trt"](generator=0, **CALL).images)
    for provider, pipe in pipes.items():
        pipe.load_lora_weights(lora, adapter_name="a")
    adapted = {provider: np.asarray(pipe(generator=0, **CALL).images) for provider, pipe in pipes.items()}
    assert float(np.abs(adapted["trt"] - adapted["cpu"]).max()) <= 1e-2
    assert float(np.abs(adapted["trt"] - base).max()) > 1e-2  # the refit changed TensorRT's weights
    for pipe in pipes.values():
        pipe.set_adapters(["a"], adapter_weights=[0.5])
    half = {provider: np.asarray(pipe(generator=0, **CALL).images) for provider, pipe in pipes.items()}
    assert float(np.abs(half["trt"] - half["cpu"]).max()) <= 1e-2
    pipes["trt"].unload_lora_weights()
    np.testing.assert_array_equal(np.asarray(pipes["trt"](generator=0, **CALL).images), base)
    with pytest.raises(ConfigError, match="textual inversion adds rows"):  # a refit keeps every weight's shape
        pipes["trt"].load_textual_inversion(np.zeros((1, 32), np.float32), token="<new>")

    plain = DiffusionPipeline.from_pretrained(fp32_package, provider="trt")  # built without --refit
    with pytest.raises(ConfigError, match="built without --refit"):
        plain.load_lora_weights(lora, adapter_name="a")
