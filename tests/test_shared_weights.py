"""`share_weights`: ONNX Runtime CPU sessions of one model file in a process read one copy of its weights.

Pipelines of one package (and LoRA variants of it, as `diffrt serve` keeps them) must make exactly the images of
unshared ones, the shared buffers must outlive any pipeline released before the others, and an override (LoRA) must
replace its own initializers in its own session only. Memory is measured in child processes, on graphs whose weights
are ~64 MiB and whose runs need little memory, so a second session's growth tells a shared copy from its own.
"""
from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import save_graph

from diffrt.errors import ConfigError
from diffrt.package.onnx_io import GraphNode
from diffrt.runtime import DiffusionPipeline
from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine
from diffrt.runtime.engines.shared_weights import live_shared_weights, read_in_place

CALL = dict(prompt="a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np")
ROWS, WIDTH = 4096, 4096  # a 64 MiB float32 table


def image_of(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(generator=0, **CALL).images)


def entries_of(model: Path) -> list:
    return [entry for entry in live_shared_weights() if Path(entry.model).resolve() == model.resolve()]


@pytest.fixture(scope="module")
def package(tiny_package, tmp_path_factory) -> Path:
    """A private copy of the tiny SD 1.5 package: its files' mapping is this module's alone (pipelines other test
    modules keep alive would hold the shared package's, and the tests here count the holders)."""
    copy = tmp_path_factory.mktemp("shared") / "sd15"
    shutil.copytree(tiny_package("sd15"), copy)
    return copy


@pytest.fixture(scope="module")
def lora_file(package, tmp_path_factory) -> Path:
    from diffrt.bench.random_lora import write_random_lora

    return write_random_lora(package, tmp_path_factory.mktemp("lora") / "random.safetensors", rank=4, std=0.2)


#: engine options under which ONNX Runtime reads every weight in place (nothing pre-packed or reordered)
IN_PLACE = {"prepack_weights": False, "disabled_optimizers": ["NchwcTransformer"]}
SETTINGS = {"default": {}, "in-place": IN_PLACE}


@pytest.fixture(scope="module")
def unshared_images(package, lora_file) -> dict[tuple[str, str], np.ndarray]:
    images = {}
    for setting, options in SETTINGS.items():
        base = DiffusionPipeline.from_pretrained(package, share_weights=False, **options)
        variant = DiffusionPipeline.from_pretrained(package, share_weights=False, **options)
        variant.load_lora_weights(lora_file)
        images[setting, "base"], images[setting, "lora"] = image_of(base), image_of(variant)
    return images


def held(engine: OnnxRuntimeEngine):
    return getattr(engine._session, "_diffrt_held")


@pytest.mark.parametrize("setting", SETTINGS)
def test_two_pipelines_of_one_package_read_one_copy_and_make_the_unshared_image(package, unshared_images, setting):
    first = DiffusionPipeline.from_pretrained(package, **SETTINGS[setting])
    second = DiffusionPipeline.from_pretrained(package, **SETTINGS[setting])
    assert np.array_equal(image_of(first), unshared_images[setting, "base"])
    assert np.array_equal(image_of(second), unshared_images[setting, "base"])
    for name in ("unet", "text_encoder", "vae_decoder"):
        one, other = first.engine(name), second.engine(name)
        assert one.weights is not None and one.weights is other.weights, name
        assert held(one).shared and held(one).shared == held(other).shared, name
        for initializer in held(one).shared:  # the very same buffers
            assert one.weights.values[initializer].data_ptr() == other.weights.values[initializer].data_ptr()


def test_only_what_onnx_runtime_reads_in_place_is_handed_out(package):
    default, in_place = (DiffusionPipeline.from_pretrained(package, **options).engine("unet")
                         for options in SETTINGS.values())
    matmul_weights = {name for name in held(in_place).shared if name in in_place.weights.in_place(False, False, True)
                      and name not in in_place.weights.in_place(True, False, True)}
    assert matmul_weights, "the in-place setting shares the weights ONNX Runtime would pre-pack"
    assert not matmul_weights & held(default).shared  # a pre-packing session gets none of them
    assert held(default).shared < held(in_place).shared


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_lora_variant_shares_the_rest_and_its_overrides_stay_its_own(package, lora_file, unshared_images, setting):
    base = DiffusionPipeline.from_pretrained(package, **SETTINGS[setting])
    variant = DiffusionPipeline.from_pretrained(package, **SETTINGS[setting])
    variant.load_lora_weights(lora_file)
    assert base.engine("unet").weights is variant.engine("unet").weights
    overridden = set(variant.engine("unet")._overrides)
    assert overridden and not overridden & held(variant.engine("unet")).shared
    if setting == "in-place":
        assert overridden <= held(base.engine("unet")).shared  # the base reads the originals from the registry
    # the variant's image carries its LoRA; the base one next to it does not
    assert np.array_equal(image_of(variant), unshared_images[setting, "lora"])
    assert np.array_equal(image_of(base), unshared_images[setting, "base"])
    assert not np.array_equal(unshared_images[setting, "lora"], unshared_images[setting, "base"])


def test_the_weights_outlive_a_released_pipeline_and_go_with_the_last_session(package, lora_file, unshared_images):
    unet = package / "unet" / "model.onnx"
    base, variant = DiffusionPipeline.from_pretrained(package), DiffusionPipeline.from_pretrained(package)
    variant.load_lora_weights(lora_file)
    image_of(base), image_of(variant)
    assert len(entries_of(unet)) == 1
    base.release_engines()
    del base
    gc.collect()
    assert np.array_equal(image_of(variant), unshared_images["default", "lora"])
    assert len(entries_of(unet)) == 1
    variant.release_engines()
    gc.collect()
    assert entries_of(unet) == []  # unmapped with the last session that read them


def test_an_engine_closed_and_reopened_maps_the_file_again_after_it_was_replaced(tmp_path):
    path = tmp_path / "scale.onnx"
    write_scale_model(path, 2.0)
    x = np.ones((2, 8), np.float32)
    first = OnnxRuntimeEngine(path, threads=1)
    assert np.array_equal(first.run({"x": x})["y"], 2 * x)
    write_scale_model(path, 3.0)  # a re-exported package: same path, new bytes
    second = OnnxRuntimeEngine(path, threads=1)
    assert np.array_equal(second.run({"x": x})["y"], 3 * x)
    assert first.weights is not second.weights
    assert np.array_equal(first.run({"x": x})["y"], 2 * x)  # the open session keeps the bytes it was built with


def write_scale_model(path: Path, scale: float, external: bool = False) -> Path:
    table = numpy_helper.from_array(np.full((2, 8), scale, np.float32), "scale")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])]
    return save_graph(path, [helper.make_node("Mul", ["x", "scale"], ["y"])], inputs, outputs, [table],
                      external_data=external)


class ReadCounting(Mapping[str, np.ndarray]):
    """Overrides made when read, as the adapters' `Overrides` makes them; counts the reads."""

    def __init__(self, values: dict[str, np.ndarray]) -> None:
        self.values, self.reads = values, 0

    def __getitem__(self, name: str) -> np.ndarray:
        self.reads += 1
        return self.values[name].copy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


@pytest.mark.parametrize("external", [False, True], ids=["inside-model.onnx", "external-data"])
def test_an_override_is_its_sessions_own_and_kept_only_where_onnx_runtime_reads_it_in_place(tmp_path, external):
    model = write_scale_model(tmp_path / "scale.onnx", 2.0, external)
    overrides = ReadCounting({"scale": np.full((2, 8), 5.0, np.float32)})
    adapted, plain = OnnxRuntimeEngine(model, threads=1, initializers=overrides), OnnxRuntimeEngine(model, threads=1)
    x = np.ones((2, 8), np.float32)
    assert np.array_equal(adapted.run({"x": x})["y"], 5 * x)
    assert np.array_equal(plain.run({"x": x})["y"], 2 * x)  # the shared weights never see the override
    assert adapted.weights is plain.weights
    # ONNX Runtime copies an external-data override while creating the session: the engine keeps no second copy
    assert len(held(adapted).values) == (0 if external else 1)
    adapted.close()
    assert np.array_equal(adapted.run({"x": x})["y"], 5 * x)  # a new session reads the overrides again
    assert overrides.reads == 2


def test_the_optimised_model_cache_is_shared_too(tmp_path, package):
    unet = package / "unet" / "model.onnx"
    cache = tmp_path / "optimized"
    writer = OnnxRuntimeEngine(unet, threads=1, optimized_model_cache=cache)
    dims = {"batch": 2, "height": 8, "width": 8, "sequence": 77}
    rng = np.random.default_rng(0)
    feeds = {spec.name: rng.standard_normal([d if isinstance(d, int) else dims[d] for d in spec.shape]).astype(
        spec.dtype) for spec in writer.inputs}
    expected = writer.run(feeds)
    readers = [OnnxRuntimeEngine(unet, threads=1, optimized_model_cache=cache) for _ in range(2)]
    for reader in readers:
        assert reader.session_path != unet  # loaded from the cache
        assert all(np.array_equal(expected[k], v) for k, v in reader.run(feeds).items())
    assert readers[0].weights is readers[1].weights and readers[0].weights.model == readers[0].session_path


def test_the_in_place_rule_follows_what_onnx_runtime_derives():
    nodes = [GraphNode("MatMul", "", ("x", "w"), ("h",), False),
             GraphNode("Conv", "", ("img", "k", "kb"), ("c",), False),
             GraphNode("Gather", "", ("table", "ids"), ("e",), False),
             GraphNode("Reshape", "", ("r", "shape"), ("r2",), False),  # constants only: folded into a new one
             GraphNode("Add", "", ("r2", "h"), ("y",), False)]
    weights = {"w", "k", "kb", "table", "r", "shape"}
    assert read_in_place(nodes, weights, True, True, True) == {"table"}  # packed, reordered, folded
    assert read_in_place(nodes, weights, False, False, False) == weights
    assert read_in_place(nodes, weights, False, True, True) == {"w", "table"}
    with_loop = [*nodes, GraphNode("Loop", "", ("n",), ("o",), True)]
    assert read_in_place(with_loop, weights, False, False, False) == frozenset()


def test_bad_sharing_options_name_the_parameter(package):
    with pytest.raises(ConfigError, match="`share_weights`"):  # a configuration error: the CLI exits 2
        OnnxRuntimeEngine(package / "unet" / "model.onnx", share_weights="yes")
    with pytest.raises(ConfigError, match="`prepack_weights`"):
        OnnxRuntimeEngine(package / "unet" / "model.onnx", prepack_weights=0)


# ----- memory, in child processes -----
def build_table_model(path: Path, external: bool) -> Path:
    """y = Gather(table, ids): ONNX Runtime reads the 64 MiB table in place (no pre-packing, no layout pass)."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((ROWS, WIDTH), dtype=np.float32), "table")
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, WIDTH])]
    return save_graph(path, [helper.make_node("Gather", ["table", "ids"], ["y"])], inputs, outputs, [table],
                      external_data=external)


def build_matmul_model(path: Path) -> Path:
    """y = x @ w with a 64 MiB `w` in external data: ONNX Runtime pre-packs it unless told not to."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((ROWS, WIDTH), dtype=np.float32) * 0.01, "w")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, ROWS])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, WIDTH])]
    return save_graph(path, [helper.make_node("MatMul", ["x", "w"], ["y"])], inputs, outputs, [weight],
                      external_data=True)


PROBE = """
import json, sys
import numpy as np
from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

def pss():  # one count per physical page, however many mappings show it
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024

path, options = sys.argv[1], json.loads(sys.argv[2])
feed_name = "ids" if "table" in path else "x"
feed = np.arange(8, dtype=np.int64) if feed_name == "ids" else np.ones((8, %d), np.float32)
readings, outputs, engines = [pss()], [], []
for _ in range(3):
    engines.append(OnnxRuntimeEngine(path, threads=1, **options))
    outputs.append(engines[-1].run({feed_name: feed}, release_memory=True)["y"])
    readings.append(pss())
print(json.dumps({"growth": [b - a for a, b in zip(readings, readings[1:])],
                  "same": all(np.array_equal(outputs[0], o) for o in outputs)}))
""" % ROWS


def probe(path: Path, **options) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(options)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MIB = 1 << 20


@pytest.mark.parametrize("external", [False, True], ids=["inside-model.onnx", "external-data"])
def test_a_second_session_of_a_file_adds_far_less_than_its_weights(tmp_path, external):
    model = build_table_model(tmp_path / "table.onnx", external)
    shared, unshared = probe(model), probe(model, share_weights=False)
    assert shared["same"] and unshared["same"]
    assert max(shared["growth"][1:]) < 16 * MIB, shared
    if not external:  # ONNX Runtime copies weights stored inside model.onnx into every session
        assert min(unshared["growth"][1:]) > 48 * MIB, unshared


def test_prepacked_gemm_weights_are_per_session_unless_prepacking_is_off(tmp_path):
    model = build_matmul_model(tmp_path / "matmul.onnx")
    packed, in_place = probe(model), probe(model, prepack_weights=False)
    assert min(packed["growth"][1:]) > 48 * MIB, packed  # ONNX Runtime has no Python API to share packed copies
    assert max(in_place["growth"][1:]) < 16 * MIB, in_place


# ----- diffrt serve --shared-weights -----
def test_serve_shared_weights_makes_every_pipeline_read_the_weights_in_place(package):
    from diffrt.serve.config import ServeConfig
    from diffrt.serve.packages import open_pipeline

    served = open_pipeline(ServeConfig([str(package)], shared_weights=True), str(package))
    variant = open_pipeline(ServeConfig([str(package)], shared_weights=True), str(package))
    unet, other = served.engine("unet"), variant.engine("unet")
    assert unet.prepack_weights is False and unet.disabled_optimizers == ["NchwcTransformer"]
    assert held(unet).shared == unet.weights.in_place(False, False, True)  # every weight it reads as stored
    assert other.weights is unet.weights
    plain = open_pipeline(ServeConfig([str(package)]), str(package)).engine("unet")
    assert plain.prepack_weights is True and not plain.disabled_optimizers


def test_serve_shared_weights_on_another_provider_is_refused_naming_the_flag(package):
    import argparse

    from diffrt.cli.serve import add_arguments, config_from
    from diffrt.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(package), "--provider", "openvino", "--shared-weights"])
    with pytest.raises(ConfigError, match="`--shared-weights` applies to provider 'cpu'.*'openvino'"):
        config_from(args)
