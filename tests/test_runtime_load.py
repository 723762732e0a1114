"""Engine loading: lazy by default, `load="eager"` at `from_pretrained`, `pipe.warmup(height, width, batch_size)`,
and the "load" stage kept apart from the compute stages in `PipelineOutput.timings` and the CLI's timing line."""
from __future__ import annotations

import re

import numpy as np
import pytest
from cli_runner import run_cli

from diffrt.cli.generate import timing_line
from diffrt.runtime import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
    StableDiffusionPipeline,
)
from diffrt.runtime.builtin import resolve_builtin

SMALL = {"prompt": "a cat", "num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def test_engines_load_lazily_by_default_and_the_first_call_reports_the_load_apart(tiny_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"))
    pipe.set_progress_bar_config(disable=True)
    assert not pipe._engines
    first = pipe(**SMALL).timings
    assert first["load"] > 0 and set(pipe._engines) == {"text_encoder", "unet", "vae_decoder"}
    second = pipe(**SMALL).timings
    assert "load" not in second
    # Session creation is load, not compute: the first call's UNet time is that of a warm call, not several times it.
    assert first["unet"] < 3 * second["unet"] + 0.05, (first, second)
    assert first["load"] > first["unet"] / 10


def test_eager_load_creates_every_engine_the_pipeline_runs_at_from_pretrained(tiny_package):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_package("sd15"), load="eager")
    pipe.set_progress_bar_config(disable=True)
    assert set(pipe._engines) == set(pipe.engine_names()) == {"text_encoder", "unet", "vae_decoder"}
    assert "load" not in pipe(**SMALL).timings
    img2img = AutoPipelineForImage2Image.from_pretrained(tiny_package("sd15"), load="eager")
    assert "vae_encoder" in img2img._engines


def test_load_option_is_checked_by_name(tiny_package):
    with pytest.raises(ValueError, match="`load`.*'lazy'.*'eager'"):
        DiffusionPipeline.from_pretrained(tiny_package("sd15"), load="soon")


@pytest.mark.parametrize("auto", [None, AutoPipelineForImage2Image, AutoPipelineForInpainting])
def test_warmup_prepares_the_size_and_batch_so_the_next_call_loads_nothing(auto, tiny_package):
    package = tiny_package("sd15")
    pipe = (auto or DiffusionPipeline).from_pretrained(package)
    pipe.set_progress_bar_config(disable=True)
    seconds = pipe.warmup(64, 96, batch_size=2)
    assert seconds > 0 and set(pipe._engines) == set(pipe.engine_names())
    assert pipe._progress_bar_config == {"disable": True}, "warmup restores the progress-bar config"
    extra = {}
    if auto is not None:
        extra["image"] = np.full((1, 64, 96, 3), 0.5, np.float32)
    if auto is AutoPipelineForInpainting:
        extra["mask_image"] = np.ones((1, 64, 96), np.float32)
    kwargs = {**SMALL, "height": 64, "width": 96, "num_images_per_prompt": 2, **extra}
    if auto is AutoPipelineForImage2Image:
        del kwargs["height"], kwargs["width"]
    out = pipe(**kwargs)
    assert "load" not in out.timings and out.images.shape == (2, 64, 96, 3)


def test_warmup_checks_its_arguments_like_a_call(tiny_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"))
    with pytest.raises(ValueError, match="batch_size"):
        pipe.warmup(64, 64, batch_size=0)
    with pytest.raises(ValueError, match="height"):
        pipe.warmup(63, 64)
    assert not pipe._engines


def test_timing_line_counts_load_inside_a_call_as_load():
    assert timing_line(0.5, {"load": 0.25, "text_encoder": 0.1, "unet": 1.0}) == \
        "load 0.75s  text_encoder 0.10s  unet 1.00s"
    assert timing_line(0.5, {"unet": 1.0}) == "load 0.50s  unet 1.00s"


def test_generate_prints_load_apart_from_the_stages(tmp_path):
    result = run_cli("generate", resolve_builtin("digits"), "7", "--steps", "2", "--seed", "1",
                     "-o", tmp_path / "seven.png")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    stages = dict((name, float(value)) for name, value in re.findall(r"(\w+) ([\d.]+)s", line))
    assert list(stages)[0] == "load" and list(stages).count("load") == 1
    assert {"text_encoder", "unet", "vae_decode"} <= set(stages)
