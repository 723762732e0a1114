"""`release_memory`: an engine hands a run's working memory back to the system, and a pipeline asks for it at the
end of each stage (the UNet's last step, each VAE call), so its resident memory between images is its weights.

Resident memory is measured in a child process (the test process's own allocations would blur it) on a graph
whose intermediate tensors are ~256 MB while its weights and inputs are ~10 MB.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import save_graph

from diffrt.errors import ConfigError, InputError
from diffrt.runtime import DiffusionPipeline
from diffrt.runtime.engines.openvino import openvino_available

ROWS, WIDTH, HIDDEN = 2048, 128, 16384  # the hidden activation: 2048 x 16384 float32 = 128 MiB, twice


def build_wide_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    up = numpy_helper.from_array(rng.standard_normal((WIDTH, HIDDEN), dtype=np.float32) * 0.05, "up")
    down = numpy_helper.from_array(rng.standard_normal((HIDDEN, WIDTH), dtype=np.float32) * 0.05, "down")
    nodes = [helper.make_node("MatMul", ["x", "up"], ["h"]), helper.make_node("Sigmoid", ["h"], ["g"]),
             helper.make_node("Mul", ["h", "g"], ["s"]), helper.make_node("MatMul", ["s", "down"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, WIDTH])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [ROWS, WIDTH])]
    return save_graph(path, nodes, inputs, outputs, [up, down])


PROBE = """
import json, sys
import numpy as np
from diffrt.runtime.engines import create_engine
from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024

path, provider = sys.argv[1], sys.argv[2]
if provider == "openvino":
    from diffrt.runtime.engines.openvino import OpenVINOEngine
    engine = OpenVINOEngine(path, threads=1, inference_precision="fp32")
else:
    engine = OnnxRuntimeEngine(path, threads=1)
x = np.random.default_rng(1).standard_normal((%d, %d), dtype=np.float32)
kept = engine.run({"x": x})["out"]
after_kept = rss()
again = engine.run({"x": x})["out"]
after_again = rss()
third = engine.run({"x": x})["out"]
after_third = rss()
released = engine.run({"x": x}, release_memory=True)["out"]
after_released = rss()
print(json.dumps({"after_kept": after_kept, "after_again": after_again, "after_third": after_third,
                  "after_released": after_released,
                  "same": bool(np.array_equal(kept, released) and np.array_equal(kept, again))}))
""" % (ROWS, WIDTH)


def in_child(script: str, *args: str) -> dict:
    """Run `script` in a fresh Python process; the JSON object it prints last."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def probe(path: Path, provider: str) -> dict:
    return in_child(PROBE, str(path), provider)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wide_model(tmp_path_factory.mktemp("memory") / "wide.onnx")


PROVIDERS = ["cpu", pytest.param("openvino", marks=pytest.mark.skipif(
    not openvino_available(), reason="openvino is not installed (pip install 'diffrt[openvino]')"))]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_release_memory_returns_the_working_memory_and_keeps_the_outputs(wide_model: Path, provider: str) -> None:
    result = probe(wide_model, provider)
    assert result["same"], "release_memory changed the outputs"
    freed = result["after_third"] - result["after_released"]
    # the engine kept >= 128 MiB of intermediate tensors between runs; released, they go back to the system
    assert freed >= 100 * 2**20, f"{provider}: release_memory freed only {freed / 2**20:.0f} MiB ({result})"
    # without release, later runs reuse what the earlier ones kept (ONNX Runtime plans its memory pattern after
    # the first run, so the steady state is the second run's)
    assert result["after_third"] - result["after_again"] < 64 * 2**20, result


def test_pipeline_release_memory_option_is_checked_and_carried(tiny_package) -> None:
    package = tiny_package("sd15")
    with pytest.raises(InputError, match="release_memory"):
        DiffusionPipeline.from_pretrained(package, release_memory="yes")
    pipe = DiffusionPipeline.from_pretrained(package, release_memory=False)
    assert pipe.release_memory is False
    from diffrt.runtime import StableDiffusionImg2ImgPipeline
    assert StableDiffusionImg2ImgPipeline.from_pipe(pipe).release_memory is False


def test_pipeline_releases_after_the_last_step_only_and_keeps_the_image(tiny_package) -> None:
    package = tiny_package("sd15")
    images, released_at = {}, {}
    for release in (True, False):
        pipe = DiffusionPipeline.from_pretrained(package, release_memory=release)
        pipe.set_progress_bar_config(disable=True)
        steps: list[bool] = []

        def record(pipeline, i, t, values, steps=steps):
            steps.append(pipeline.last_step(i))
            return values

        images[release] = pipe("a cat", num_inference_steps=3, height=64, width=64, generator=0, output_type="np",
                               callback_on_step_end=record).images
        released_at[release] = steps
    assert released_at[True] == [False] * (len(released_at[True]) - 1) + [True]  # PNDM: 3 steps, 4 UNet calls
    assert not any(released_at[False])
    np.testing.assert_array_equal(images[True], images[False])


MAPPED = 2 * 2**20  # float32 elements per weight: 8 MiB each


def build_in_place_model(path: Path) -> Path:
    """out = (x + bias) * scale, both weights 8 MiB in external data: element-wise ops read them as stored."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(MAPPED, dtype=np.float32), name)
               for name in ("bias", "scale")]
    nodes = [helper.make_node("Add", ["x", "bias"], ["h"]), helper.make_node("Mul", ["h", "scale"], ["out"])]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [MAPPED]) for name in ("x", "out")]
    return save_graph(path, nodes, io[:1], io[1:], weights, external_data=True)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("cached", [False, True], ids=["package-file", "optimised-model-cache"])
def test_release_memory_drops_the_mapped_weights_from_the_resident_set(tmp_path: Path, cached: bool) -> None:
    from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine
    from diffrt.runtime.engines.residency import resident_bytes

    path = build_in_place_model(tmp_path / "unet" / "model.onnx")
    cache = tmp_path / "cache"
    options = {"threads": 1, "optimized_model_cache": cache if cached else None}
    if cached:  # the first session writes the cache; the engine under test loads from it
        OnnxRuntimeEngine(path, **options).run({"x": np.zeros(MAPPED, np.float32)})
    folder = cache if cached else path.parent
    x = np.random.default_rng(1).standard_normal(MAPPED, dtype=np.float32)
    weights = 2 * MAPPED * 4

    engine = OnnxRuntimeEngine(path, **options)
    kept = engine.run({"x": x})["out"]
    assert engine.session_path.parent == folder
    assert resident_bytes([folder]) >= weights - 2**20, "the session should read its weights from a mapped file"
    released = engine.run({"x": x}, release_memory=True)["out"]
    assert resident_bytes([folder]) < 2**20
    again = engine.run({"x": x})["out"]  # the pages fault back in: same bytes, same output
    assert resident_bytes([folder]) >= weights - 2**20
    for out in (released, again):
        np.testing.assert_array_equal(out, kept)

    held = OnnxRuntimeEngine(path, trim_mapped_weights=False, **options)
    held.run({"x": x}, release_memory=True)
    assert resident_bytes([folder]) >= weights - 2**20
    with pytest.raises(ConfigError, match="`trim_mapped_weights` must be True or False; got 'yes'"):
        OnnxRuntimeEngine(path, trim_mapped_weights="yes")


PATTERN_PROBE = """
import json, sys
import numpy as np
from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

engine = OnnxRuntimeEngine(sys.argv[1], threads=1, **json.loads(sys.argv[2]))
x = np.random.default_rng(1).standard_normal((%d, %d), dtype=np.float32)
outs = [engine.run({"x": x})["out"] for _ in range(3)]
print(json.dumps({"peak": peak(), "pattern": engine.session.get_session_options().enable_mem_pattern,
                  "checksum": float(np.abs(outs[-1]).sum()), "same": all(np.array_equal(o, outs[0]) for o in outs)}))
""" % (ROWS, WIDTH)


def pattern_probe(path: Path, options: dict) -> dict:
    return in_child(PATTERN_PROBE, str(path), json.dumps(options))


def test_the_memory_pattern_is_off_with_the_cpu_arena_which_would_keep_both(wide_model: Path) -> None:
    """With the arena, ONNX Runtime's memory pattern adds its planned block beside the chunks the first run took,
    and the arena keeps both; without the pattern the arena reuses those chunks. Without the arena the pattern
    stays on (one allocation per run instead of one per tensor)."""
    default = pattern_probe(wide_model, {})
    patterned = pattern_probe(wide_model, {"memory_pattern": True})
    no_arena = pattern_probe(wide_model, {"memory_arena": False})
    assert default["pattern"] is False and patterned["pattern"] is True and no_arena["pattern"] is True
    assert default["same"] and patterned["same"] and default["checksum"] == patterned["checksum"]
    # the hidden activations are 128 MiB each: the pattern's block holds them again beside the arena's chunks
    # (measured: 127 MiB more peak, 487 vs 614 MiB)
    saved = patterned["peak"] - default["peak"]
    assert saved >= 96 * 2**20, f"the pattern cost only {saved / 2**20:.0f} MiB more ({default}, {patterned})"
    from diffrt.runtime.engines.onnxruntime import OnnxRuntimeEngine

    with pytest.raises(ConfigError, match="`memory_pattern` must be None, True or False; got 'off'"):
        OnnxRuntimeEngine(wide_model, memory_pattern="off")
