"""Pipeline behaviour beyond parity: bad input, concurrency, torch-free process, scheduler swapping."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from diffrt.errors import PackageError
from diffrt.runtime import DiffusionPipeline, StableDiffusionImg2ImgPipeline

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def sd15(tiny_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _small(**kw):
    return {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np", **kw}


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"height": 60}, "height"),
        ({"width": 100}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_rescale": 1.5}, "guidance_rescale"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"clip_skip": 0}, "clip_skip"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
        ({"generator": [0, 1, 2]}, "generator"),
        ({"latents": np.zeros((1, 4, 4, 4), np.float32)}, "latents"),
        ({"callback_on_step_end_tensor_inputs": ["nope"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them_before_any_engine_runs(sd15, kwargs, names):
    sd15._engines.clear()
    with pytest.raises(ValueError, match=names):
        sd15(PROMPT, **_small(**kwargs))
    assert not sd15._engines, "an engine was created before the arguments were checked"


def test_img2img_rejects_strength_outside_unit_interval_and_missing_image(tiny_package):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_package("sd15"))
    image = np.zeros((1, 64, 64, 3), np.float32)
    with pytest.raises(ValueError, match="strength"):
        pipe(PROMPT, image=image, strength=1.5)
    with pytest.raises(ValueError, match="image"):
        pipe(PROMPT, image=None)
    assert not pipe._engines


def test_unavailable_provider_is_a_value_error_naming_it(tiny_package):
    with pytest.raises(ValueError, match="tensorrt|TensorRT|cuda|CUDA"):
        DiffusionPipeline.from_pretrained(tiny_package("sd15"), provider="cuda")


def test_package_with_a_missing_component_is_rejected_at_load(tiny_package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_package("sd15"), broken)
    shutil.rmtree(broken / "vae_decoder")
    with pytest.raises(PackageError, match="vae_decoder"):
        DiffusionPipeline.from_pretrained(broken)


def test_four_threads_on_one_pipeline_give_the_images_of_sequential_runs(sd15):
    from diffrt.schedulers import EulerAncestralDiscreteScheduler

    sd15.scheduler = EulerAncestralDiscreteScheduler.from_config(sd15.scheduler.config)
    seeds = [11, 12, 13, 14]
    sequential = {s: sd15(PROMPT, generator=s, **_small()).images for s in seeds}
    results: dict[int, np.ndarray] = {}

    def work(seed: int) -> None:
        results[seed] = sd15(PROMPT, generator=seed, **_small()).images

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seeds:
        np.testing.assert_array_equal(results[s], sequential[s])
    assert not np.array_equal(sequential[11], sequential[12])


def test_swapping_the_scheduler_like_diffusers_changes_the_schedule(sd15):
    from diffrt.schedulers import DDIMScheduler, EulerDiscreteScheduler

    sd15.scheduler = EulerDiscreteScheduler.from_config(sd15.scheduler.config)
    a = sd15(PROMPT, generator=0, **_small()).images
    sd15.scheduler = DDIMScheduler.from_config(sd15.scheduler.config)
    b = sd15(PROMPT, generator=0, **_small()).images
    assert a.shape == b.shape and not np.allclose(a, b)


def test_callback_on_step_end_sees_and_can_replace_latents(sd15):
    seen = []

    def callback(pipe, i, t, values):
        seen.append((i, values["latents"].shape))
        return {"latents": values["latents"] * 0}

    sd15(PROMPT, generator=0, callback_on_step_end=callback, **_small())
    assert [i for i, _ in seen] == [0, 1] and seen[0][1] == (1, 4, 8, 8)


def test_a_full_generation_never_imports_torch_transformers_or_diffusers(tiny_package):
    code = (
        "import sys, json\n"
        "from diffrt.runtime import DiffusionPipeline\n"
        f"pipe = DiffusionPipeline.from_pretrained({str(tiny_package('sdxl'))!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "img = pipe('a cat', num_inference_steps=2, height=64, width=64, generator=0).images[0]\n"
        "print(json.dumps([m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_import_diffrt_runtime_is_torch_free_and_lazy():
    code = ("import sys, diffrt, diffrt.runtime, diffrt.schedulers; "
            "print(sorted(m for m in ('torch','onnxruntime','transformers','diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
