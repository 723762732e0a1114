"""ControlNet pipelines: our package (exported with two tiny ControlNets, `pose` and `depth`) against Diffusers'
ControlNet pipelines on the original folders, same seed, output_type "np".

Tolerance: max abs diff <= 1e-3 on images in [0, 1], as in test_runtime_pipelines (the ControlNet adds one ONNX
Runtime vs PyTorch graph per step; its float32 kernel differences stay around 1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from checkpoint_fixtures import CONTROLNET_NAMES, CONTROLNET_PACKAGES  # noqa: E402
from test_runtime_pipelines import PROMPT, assert_close  # noqa: E402

from diffrt.errors import InputError  # noqa: E402
from diffrt.runtime import DiffusionPipeline  # noqa: E402

SIZE = 64  # pixels; 8x8 latents for the tiny UNet


def control_image(seed: int, size: int = SIZE) -> Image.Image:
    """A random RGB picture: a ControlNet sees every pixel, so a flat one would test little."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


_diffusers_cache: dict = {}


def diffusers_pipe(kind, names, tiny_checkpoint, tiny_controlnet, cls_name):
    """Diffusers' ControlNet pipeline `cls_name` on the tiny base with the ControlNets `names` (pose / depth)."""
    key = (kind, tuple(names), cls_name)
    if key not in _diffusers_cache:
        folders = dict(zip(CONTROLNET_NAMES, CONTROLNET_PACKAGES[kind]))
        nets = [diffusers.ControlNetModel.from_pretrained(tiny_controlnet(folders[name])) for name in names]
        pipe = getattr(diffusers, cls_name).from_pretrained(tiny_checkpoint(kind),
                                                            controlnet=nets[0] if len(nets) == 1 else nets)
        pipe.set_progress_bar_config(disable=True)
        _diffusers_cache[key] = pipe
    return _diffusers_cache[key]


_ours_cache: dict = {}


def our_pipe(kind, names, tiny_controlnet_package, cls=DiffusionPipeline):
    key = (kind, tuple(names), cls)
    if key not in _ours_cache:
        pipe = cls.from_pretrained(tiny_controlnet_package(kind), controlnet=list(names))
        pipe.set_progress_bar_config(disable=True)
        _ours_cache[key] = pipe
    return _ours_cache[key]


def run_both(kind, names, fixtures, cls_name, seed=0, **kwargs):
    tiny_checkpoint, tiny_controlnet, tiny_controlnet_package = fixtures
    ref = diffusers_pipe(kind, names, tiny_checkpoint, tiny_controlnet, cls_name)
    expected = ref(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images
    ours = our_pipe(kind, names, tiny_controlnet_package)
    got = ours(generator=seed, output_type="np", **kwargs).images
    return np.asarray(expected), np.asarray(got)


@pytest.fixture
def fixtures(tiny_checkpoint, tiny_controlnet, tiny_controlnet_package):
    return tiny_checkpoint, tiny_controlnet, tiny_controlnet_package


SD_CASES = {
    "single": (["pose"], {"image": control_image(1)}),
    "scale": (["pose"], {"image": control_image(1), "controlnet_conditioning_scale": 0.6}),
    "guidance window": (["pose"], {"image": control_image(1), "control_guidance_start": 0.25,
                                   "control_guidance_end": 0.75}),
    "guess mode": (["pose"], {"image": control_image(1), "guess_mode": True}),
    "multi": (["pose", "depth"], {"image": [control_image(1), control_image(2)],
                                  "controlnet_conditioning_scale": [0.9, 0.5],
                                  "control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]}),
    "multi guess mode": (["depth", "pose"], {"image": [control_image(2), control_image(1)], "guess_mode": True}),
    "batch": (["pose"], {"image": [control_image(1), control_image(3)], "num_images_per_prompt": 2,
                         "prompt": [PROMPT, "a dog"]}),
}


@pytest.mark.parametrize("case", sorted(SD_CASES))
def test_sd15_controlnet_matches_diffusers(case, fixtures):
    names, kwargs = SD_CASES[case]
    kwargs = {"prompt": PROMPT, "num_inference_steps": 4, **kwargs}
    expected, got = run_both("sd15", names, fixtures, "StableDiffusionControlNetPipeline", **kwargs)
    assert got.shape[1:3] == (SIZE, SIZE)
    assert_close(expected, got)


SDXL_CASES = {
    "single": (["pose"], {"image": control_image(1)}),
    "multi guess mode window": (["pose", "depth"], {"image": [control_image(1), control_image(2)],
                                                    "guess_mode": True, "control_guidance_end": [1.0, 0.5]}),
}


@pytest.mark.parametrize("case", sorted(SDXL_CASES))
def test_sdxl_controlnet_matches_diffusers(case, fixtures):
    names, kwargs = SDXL_CASES[case]
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, **kwargs}
    expected, got = run_both("sdxl", names, fixtures, "StableDiffusionXLControlNetPipeline", **kwargs)
    assert_close(expected, got)


def test_controlnet_changes_the_image(fixtures):
    """The residuals reach the UNet: the same call without its ControlNet gives another image."""
    from diffrt.runtime.pipelines.stable_diffusion import StableDiffusionPipeline

    _, _, package = fixtures
    controlled = our_pipe("sd15", ["pose"], package)(PROMPT, image=control_image(1), num_inference_steps=2,
                                                     generator=0, output_type="np").images
    plain = StableDiffusionPipeline.from_pretrained(package(kind := "sd15"))
    plain.set_progress_bar_config(disable=True)
    free = plain(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, generator=0, output_type="np").images
    assert kind and np.abs(controlled - free).max() > 1e-2


def test_sd15_controlnet_img2img_matches_diffusers(fixtures):
    kwargs = {"prompt": PROMPT, "image": control_image(5), "control_image": control_image(1), "strength": 0.7,
              "num_inference_steps": 4}
    tiny_checkpoint, tiny_controlnet, package = fixtures
    ref = diffusers_pipe("sd15", ["pose"], tiny_checkpoint, tiny_controlnet, "StableDiffusionControlNetImg2ImgPipeline")
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).images
    from diffrt.runtime.pipelines.controlnet import StableDiffusionControlNetImg2ImgPipeline

    ours = our_pipe("sd15", ["pose"], package, StableDiffusionControlNetImg2ImgPipeline)
    assert_close(np.asarray(expected), ours(generator=0, output_type="np", **kwargs).images)


def test_sd15_controlnet_inpaint_matches_diffusers(fixtures):
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[16:48, 8:40] = 1.0
    kwargs = {"prompt": PROMPT, "image": control_image(5), "mask_image": Image.fromarray((mask * 255).astype(np.uint8)),
              "control_image": control_image(1), "strength": 0.8, "num_inference_steps": 4}
    tiny_checkpoint, tiny_controlnet, package = fixtures
    ref = diffusers_pipe("sd15", ["pose"], tiny_checkpoint, tiny_controlnet, "StableDiffusionControlNetInpaintPipeline")
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).images
    from diffrt.runtime.pipelines.controlnet import StableDiffusionControlNetInpaintPipeline

    ours = our_pipe("sd15", ["pose"], package, StableDiffusionControlNetInpaintPipeline)
    assert_close(np.asarray(expected), ours(generator=0, output_type="np", **kwargs).images)


def test_sdxl_controlnet_img2img_matches_diffusers(fixtures):
    kwargs = {"prompt": PROMPT, "image": control_image(5), "control_image": control_image(1), "strength": 0.7,
              "num_inference_steps": 3}
    tiny_checkpoint, tiny_controlnet, package = fixtures
    ref = diffusers_pipe("sdxl", ["pose"], tiny_checkpoint, tiny_controlnet,
                         "StableDiffusionXLControlNetImg2ImgPipeline")
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).images
    from diffrt.runtime.pipelines.controlnet_xl import StableDiffusionXLControlNetImg2ImgPipeline

    ours = our_pipe("sdxl", ["pose"], package, StableDiffusionXLControlNetImg2ImgPipeline)
    assert_close(np.asarray(expected), ours(generator=0, output_type="np", **kwargs).images)


@pytest.mark.parametrize("task, expected", [
    ("AutoPipelineForText2Image", "StableDiffusionControlNetPipeline"),
    ("AutoPipelineForImage2Image", "StableDiffusionControlNetImg2ImgPipeline"),
    ("AutoPipelineForInpainting", "StableDiffusionControlNetInpaintPipeline"),
])
def test_auto_classes_pick_the_controlnet_pipelines(task, expected, tiny_controlnet_package):
    import diffrt.runtime as runtime

    pipe = getattr(runtime, task).from_pretrained(tiny_controlnet_package("sd15"))
    assert type(pipe).__name__ == expected


def test_warmup_runs_every_controlnet(tiny_controlnet_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_controlnet_package("sd15"))
    pipe.warmup(height=SIZE, width=SIZE)  # a gray control image for each ControlNet
    assert {"controlnet_pose", "controlnet_depth", "unet"} <= set(pipe._engines)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "`image` .*required"),
    ({"image": control_image(1), "controlnet_conditioning_scale": float("nan")}, "controlnet_conditioning_scale"),
    ({"image": control_image(1), "controlnet_conditioning_scale": [1.0, 1.0]}, "controlnet_conditioning_scale"),
    ({"image": control_image(1), "control_guidance_start": 0.8, "control_guidance_end": 0.2},
     "control_guidance_start"),
    ({"image": control_image(1), "control_guidance_end": 1.5}, "control_guidance_end"),
    ({"image": control_image(1), "guess_mode": "yes"}, "guess_mode"),
    ({"image": np.full((SIZE, SIZE, 3), 2.0, np.float32)}, "`image`"),
    ({"image": control_image(1, size=4)}, "`image`"),
])
def test_bad_controlnet_arguments_are_refused_before_any_engine(kwargs, message, tiny_controlnet_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_controlnet_package("sd15"), controlnet="pose")
    with pytest.raises(InputError, match=message):
        pipe(PROMPT, num_inference_steps=2, **kwargs)
    assert pipe._engines == {}


def test_multi_controlnet_needs_one_image_per_net(tiny_controlnet_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_controlnet_package("sd15"))
    assert pipe.controlnet_names == ["pose", "depth"] and isinstance(pipe.controlnet, list)
    with pytest.raises(InputError, match="a list of 2 images"):
        pipe(PROMPT, image=control_image(1), num_inference_steps=2)


def test_unknown_controlnet_name_lists_the_package_ones(tiny_controlnet_package):
    with pytest.raises(InputError, match="pose, depth"):
        DiffusionPipeline.from_pretrained(tiny_controlnet_package("sd15"), controlnet="canny")


def test_a_saved_controlnet_pipeline_exports_with_its_controlnet(tiny_checkpoint, tiny_controlnet, tmp_path):
    """`StableDiffusionControlNetPipeline.save_pretrained` writes the ControlNet beside the UNet; `diffrt export`
    of that folder keeps it (as `controlnet_controlnet`) and the package gives Diffusers' image."""
    from diffrt.export import export_pipeline
    from diffrt.package.files import read_json

    net = diffusers.ControlNetModel.from_pretrained(tiny_controlnet("cn_sd15"))
    reference = diffusers.StableDiffusionControlNetPipeline.from_pretrained(tiny_checkpoint("sd15"), controlnet=net)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path / "ck")
    package = export_pipeline(tmp_path / "ck", tmp_path / "package")
    manifest = read_json(package / "diffrt.json")
    assert manifest["pipeline"] == "StableDiffusionControlNetPipeline"
    assert "controlnet_controlnet" in manifest["components"]
    kwargs = {"prompt": PROMPT, "image": control_image(3), "num_inference_steps": 2, "height": SIZE, "width": SIZE}
    expected = reference(generator=torch.Generator("cpu").manual_seed(5), output_type="np", **kwargs).images
    ours = DiffusionPipeline.from_pretrained(package)
    ours.set_progress_bar_config(disable=True)
    assert_close(np.asarray(ours(generator=5, output_type="np", **kwargs).images), np.asarray(expected))
