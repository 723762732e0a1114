"""Engine options for one component (`component_options`, `diffrt generate --engine-option COMPONENT:KEY=VALUE`):
what a user sets to trade one engine's memory for speed (the VAE decoder at ONNX Runtime level "extended") without
touching the others. Real tiny packages, real ONNX Runtime sessions."""
from __future__ import annotations

import numpy as np
import pytest
from cli_runner import one_line_error, run_cli
from PIL import Image

from diffrt import DiffusionPipeline
from diffrt.errors import InputError

CALL = dict(prompt="a red cube", num_inference_steps=2, height=64, width=64, generator=0, output_type="np")
VAE_EXTENDED = {"vae_decoder": {"graph_optimization_level": "extended"}}


def test_a_component_option_reaches_that_engine_only_and_keeps_the_image(tiny_package):
    package = tiny_package("sd15")
    default = DiffusionPipeline.from_pretrained(package, threads=1)
    tuned = DiffusionPipeline.from_pretrained(package, threads=1, component_options=VAE_EXTENDED)
    expected, image = default(**CALL).images, tuned(**CALL).images
    assert tuned.engine("vae_decoder").graph_optimization_level == "extended"
    assert tuned.engine("unet").graph_optimization_level == "all"
    assert tuned.engine("unet").threads == tuned.engine("vae_decoder").threads == 1  # common options still apply
    # another optimisation level fuses other nodes: float32 rounding only
    assert np.abs(image - expected).max() < 1e-4
    img2img = DiffusionPipeline.from_pipe(tuned)
    assert img2img.component_options == VAE_EXTENDED


@pytest.mark.parametrize("options, message", [
    ({"vae": {"threads": 1}}, "`component_options` must be keys among this package's components (text_encoder, "),
    ({"unet": "extended"}, "`component_options` must be a dict of component name -> dict of engine options"),
])
def test_component_options_for_an_unknown_component_are_refused_before_loading(tiny_package, options, message):
    with pytest.raises(InputError) as info:
        DiffusionPipeline.from_pretrained(tiny_package("sd15"), component_options=options)
    assert message in str(info.value)


def test_generate_takes_engine_options_per_component(tiny_package, tmp_path):
    out = tmp_path / "cube.png"
    result = run_cli("generate", tiny_package("sd15"), "a red cube", "--steps", "2", "--height", "64", "--width",
                     "64", "--seed", "0", "--engine-option", "vae_decoder:graph_optimization_level=extended",
                     "--engine-option", "threads=1", "-o", out)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("option, status, fragments", [
    ("vae_decoder:graph_optimization_level", 2, ("argument --engine-option", "expected [COMPONENT:]KEY=VALUE")),
    # the engine refuses the value when it is created, before any step runs: a bad value (status 2), like a bad key
    ("vae_decoder:graph_optimization_level=max", 2, ("`graph_optimization_level` must be one of disable, basic",)),
    ("threads=0", 2, ("`threads` must be None or an integer >= 1",)),
    ("vae:threads=1", 2, ("`component_options` must be keys among this package's components",)),
])
def test_generate_names_a_bad_engine_option(tiny_package, tmp_path, option, status, fragments):
    result = run_cli("generate", tiny_package("sd15"), "a red cube", "--steps", "1", "--height", "64", "--width",
                     "64", "--engine-option", option, "-o", tmp_path / "x.png")
    assert result.returncode == status, result.stderr
    assert not (tmp_path / "x.png").exists()
    if fragments[0].startswith("argument"):
        assert all(fragment in result.stderr for fragment in fragments), result.stderr
    else:
        one_line_error(result.stderr, "generate", *fragments)


def test_engines_run_once_per_image_allocate_without_the_arena_while_the_pipeline_releases_memory(tiny_package):
    """The text encoder and VAE run once per image: without ONNX Runtime's CPU arena a run peaks at what it holds,
    and the image is the same bit for bit; the UNet (every step) keeps its arena. An explicit option wins."""
    package = tiny_package("sd15")
    released = DiffusionPipeline.from_pretrained(package, threads=1)
    kept = DiffusionPipeline.from_pretrained(package, threads=1, release_memory=False)
    chosen = DiffusionPipeline.from_pretrained(package, threads=1, component_options={"vae_decoder": {
        "memory_arena": True}})
    np.testing.assert_array_equal(released(**CALL).images, kept(**CALL).images)
    for name, arena in (("text_encoder", False), ("vae_decoder", False), ("unet", True)):
        engine = released.engine(name)
        assert engine.memory_arena is arena
        assert engine.session.get_session_options().enable_cpu_mem_arena is arena
    assert all(kept.engine(name).memory_arena for name in ("text_encoder", "vae_decoder", "unet"))
    assert chosen.engine("vae_decoder").memory_arena and not chosen.engine("text_encoder").memory_arena


def test_memory_arena_must_be_a_bool(tiny_package):
    from diffrt.errors import ConfigError

    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"), memory_arena="no")
    with pytest.raises(ConfigError, match="`memory_arena` must be True or False; got 'no'"):
        pipe(**CALL)
