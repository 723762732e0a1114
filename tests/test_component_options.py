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
    # the engine refuses the value when it is created (status 1: an engine error), before any step runs
    ("vae_decoder:graph_optimization_level=max", 1, ("`graph_optimization_level` must be one of disable, basic",)),
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
