"""Bad call arguments of every pipeline class: refused by name, with the allowed range, before any engine exists.

"Before any engine" is checked by `pipe._engines` staying empty (engines are created lazily): an argument caught
only by an engine (or after prompt encoding, noise allocation, VAE encoding) would have created one. The limits
come from the package's manifest (`dims`), read independently here.
"""
from __future__ import annotations

import inspect
import json
import time

import numpy as np
import pytest

from diffrt.runtime import (
    LatentConsistencyModelPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffrt.runtime.builtin import resolve_builtin

PROMPT = "a photo of a cat"
IMAGE = np.full((1, 64, 64, 3), 0.5, np.float32)
MASK = np.zeros((1, 64, 64), np.float32)

# class -> (tiny package kind, the smallest valid call)
CLASSES = {
    StableDiffusionPipeline: ("sd15", {"height": 64, "width": 64}),
    StableDiffusionImg2ImgPipeline: ("sd15", {"image": IMAGE}),
    StableDiffusionInpaintPipeline: ("sd_inpaint", {"image": IMAGE, "mask_image": MASK, "height": 64, "width": 64}),
    LatentConsistencyModelPipeline: ("lcm", {"height": 64, "width": 64}),
    StableDiffusionXLPipeline: ("sdxl", {"height": 64, "width": 64}),
    StableDiffusionXLImg2ImgPipeline: ("sdxl", {"image": IMAGE}),
    StableDiffusionXLInpaintPipeline: ("sdxl", {"image": IMAGE, "mask_image": MASK, "height": 64, "width": 64}),
}
IDS = {cls: cls.__name__ for cls in CLASSES}
_pipes: dict = {}


@pytest.fixture
def make(tiny_package):
    """(pipe, valid call kwargs) for a class; pipelines are cached, their engines cleared for each test."""
    def get(cls):
        kind, kwargs = CLASSES[cls]
        if cls not in _pipes:
            _pipes[cls] = cls.from_pretrained(tiny_package(kind))
            _pipes[cls].set_progress_bar_config(disable=True)
        pipe = _pipes[cls]
        pipe.release_engines()
        return pipe, {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "np", **kwargs}

    return get


def refused(pipe, kwargs, name, *contains):
    """The call raises a ValueError naming `name` (and each of `contains`) before any engine is created."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"`{name}`") as error:
        pipe(**kwargs)
    for text in contains:
        assert text in str(error.value), str(error.value)
    assert not pipe._engines, f"an engine was created before `{name}` was checked"
    assert time.perf_counter() - start < 5.0, "the check ran after heavy work"
    return str(error.value)


def float_parameters(cls) -> list[str]:
    """Every float argument of the class's `__call__` (annotation `float` or `float | None`)."""
    return [name for name, p in inspect.signature(cls.__call__).parameters.items()
            if str(p.annotation).startswith("float")]


def manifest_dims(package, component="unet"):
    manifest = json.loads((package / "diffrt.json").read_text())
    return manifest["components"][component]["dims"]


# ----- NaN and infinity -----
@pytest.mark.parametrize("cls", CLASSES, ids=IDS.get)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_every_float_argument_refuses_nan_and_infinity_by_name(cls, value, make):
    pipe, kwargs = make(cls)
    names = float_parameters(cls)
    assert "guidance_scale" in names
    for name in names:
        refused(pipe, {**kwargs, name: value}, name, "finite")


@pytest.mark.parametrize("cls", [StableDiffusionPipeline, StableDiffusionXLPipeline], ids=IDS.get)
def test_nan_in_latents_or_prompt_embeds_is_refused_by_name(cls, make):
    pipe, kwargs = make(cls)
    latents = np.zeros((1, 4, 8, 8), np.float32)
    latents[0, 0, 0, 0] = np.nan
    refused(pipe, {**kwargs, "latents": latents}, "latents", "NaN")
    if cls is StableDiffusionPipeline:
        embeds = np.zeros((1, 77, 32), np.float32)
        embeds[0, 3, 1] = np.inf
        refused(pipe, {**kwargs, "prompt": None, "prompt_embeds": embeds}, "prompt_embeds", "NaN")


def test_sdxl_size_conditioning_refuses_nan(make):
    pipe, kwargs = make(StableDiffusionXLPipeline)
    refused(pipe, {**kwargs, "original_size": (float("nan"), 64)}, "original_size")
    refused(pipe, {**kwargs, "target_size": (64,)}, "target_size")


# ----- sizes, batch and steps against the package -----
@pytest.mark.parametrize("cls", [c for c in CLASSES if "height" in CLASSES[c][1]], ids=IDS.get)
@pytest.mark.parametrize("name", ["height", "width"])
def test_a_size_beyond_the_package_range_names_the_argument_and_the_range(cls, name, make, tiny_package):
    pipe, kwargs = make(cls)
    dims = manifest_dims(tiny_package(CLASSES[cls][0]))
    high = dims[name][1] * pipe.vae_scale_factor
    message = refused(pipe, {**kwargs, name: 100_000}, name, f"{high}]", "100000")
    assert "pixels" in message
    refused(pipe, {**kwargs, name: high + pipe.vae_scale_factor}, name, f"{high}]")


@pytest.mark.parametrize("cls", [StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline], ids=IDS.get)
def test_image_to_image_names_an_image_beyond_the_package_range_before_converting_it(cls, make, tiny_package):
    pipe, kwargs = make(cls)
    # A 20000 x 20000 float image that takes no memory: the size must be refused before any pixel is touched.
    huge = np.broadcast_to(np.float32(0.5), (1, 20_000, 20_000, 3))
    refused(pipe, {**kwargs, "image": huge}, "image", "20000x20000")
    latents = np.zeros((1, 4, 700, 8), np.float32)  # latents as `image`: 5600 px high
    refused(pipe, {**kwargs, "image": latents}, "image", "5600x64")


@pytest.mark.parametrize("cls", CLASSES, ids=IDS.get)
def test_too_many_images_per_call_names_num_images_per_prompt_with_the_limit(cls, make, tiny_package):
    pipe, kwargs = make(cls)
    rows = manifest_dims(tiny_package(CLASSES[cls][0]))["batch"][1]
    guided = cls is not LatentConsistencyModelPipeline  # LCM runs no classifier-free guidance
    most = rows // 2 if guided else rows
    message = refused(pipe, {**kwargs, "num_images_per_prompt": most + 1}, "num_images_per_prompt", f"{most}]")
    assert f"{most + 1} images" in message
    if guided:
        assert "2 rows per image" in message
    # several prompts: prompts x num_images_per_prompt is what counts
    refused(pipe, {**kwargs, "prompt": [PROMPT] * 3, "num_images_per_prompt": most // 3 + 1},
            "num_images_per_prompt", "3 prompt(s)")


def test_the_batch_limit_allows_twice_the_images_without_guidance(make, tiny_package):
    pipe, kwargs = make(StableDiffusionPipeline)
    rows = manifest_dims(tiny_package("sd15"))["batch"][1]
    refused(pipe, {**kwargs, "num_images_per_prompt": rows // 2 + 1}, "num_images_per_prompt")
    pipe.limits.check_batch(1, rows // 2 + 1, False, pipe.vae_components, False, ["text_encoder"])  # no error


@pytest.mark.parametrize("cls", CLASSES, ids=IDS.get)
def test_more_steps_than_the_timestep_grid_holds_is_refused_before_any_work(cls, make):
    pipe, kwargs = make(cls)
    train = pipe.scheduler.config.num_train_timesteps
    refused(pipe, {**kwargs, "num_inference_steps": 1_000_000}, "num_inference_steps", f"[1, {train}]")
    refused(pipe, {**kwargs, "num_inference_steps": train + 1}, "num_inference_steps")


def test_lcm_steps_beyond_its_distillation_grid_are_refused_before_the_prompt_is_encoded(make):
    pipe, kwargs = make(LatentConsistencyModelPipeline)
    original = pipe.scheduler.config.original_inference_steps
    refused(pipe, {**kwargs, "num_inference_steps": original + 1}, "num_inference_steps", str(original))


def test_euler_takes_as_many_steps_as_the_grid_holds(make):
    """The limit is the grid, not lower: num_train_timesteps itself passes the check."""
    from diffrt.runtime.pipelines import checks

    pipe, _ = make(StableDiffusionPipeline)
    checks.check_steps_fit(pipe.scheduler, pipe.scheduler.config.num_train_timesteps, None, None)


# ----- embeddings and masks name the argument the user passed -----
def test_wrong_width_prompt_embeds_is_named_with_the_expected_shape(make):
    pipe, kwargs = make(StableDiffusionPipeline)
    kwargs = {**kwargs, "prompt": None}
    refused(pipe, {**kwargs, "prompt_embeds": np.zeros((1, 77, 33), np.float32)}, "prompt_embeds", "32")
    refused(pipe, {**kwargs, "prompt_embeds": np.zeros((1, 77), np.float32)}, "prompt_embeds")
    good = np.zeros((1, 77, 32), np.float32)
    refused(pipe, {**kwargs, "prompt_embeds": good, "negative_prompt_embeds": np.zeros((1, 80, 32), np.float32)},
            "negative_prompt_embeds", "(1, 77, 32)")


def test_sdxl_wrong_width_pooled_prompt_embeds_is_named(make):
    pipe, kwargs = make(StableDiffusionXLPipeline)
    width = next(s for s in pipe.package.component("unet").inputs if s.name == "text_embeds").shape[1]
    embeds = np.zeros((1, 77, pipe.unet.config.cross_attention_dim), np.float32)
    refused(pipe, {**kwargs, "prompt": None, "prompt_embeds": embeds,
                   "pooled_prompt_embeds": np.zeros((1, width + 1), np.float32)}, "pooled_prompt_embeds", str(width))


@pytest.mark.parametrize("cls", [StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline], ids=IDS.get)
def test_a_mask_batch_that_does_not_fit_names_mask_image(cls, make):
    pipe, kwargs = make(cls)
    refused(pipe, {**kwargs, "mask_image": np.zeros((2, 64, 64), np.float32)}, "mask_image", "batch of 2")
    refused(pipe, {**kwargs, "mask_image": np.full((1, 64, 64), np.nan, np.float32)}, "mask_image")
    refused(pipe, {**kwargs, "image": np.zeros((3, 64, 64, 3), np.float32), "num_images_per_prompt": 2},
            "image", "batch of 3")


# ----- the package's VAE scale factor (the digits model's is 4, not 8) -----
@pytest.fixture(scope="module")
def digits_img2img():
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(resolve_builtin("digits"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digits_img2img_keeps_a_36_pixel_image_at_36_pixels(digits_img2img):
    assert digits_img2img.vae_scale_factor == 4
    image = np.random.default_rng(0).random((36, 36, 3)).astype(np.float32)
    out = digits_img2img("7", image=image, num_inference_steps=2, strength=0.5, generator=0, output_type="np")
    assert out.images.shape == (1, 36, 36, 3)


def test_digits_img2img_matches_diffusers_at_a_size_only_its_scale_factor_allows():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from pathlib import Path

    checkpoint = Path(__file__).parent / "data" / "digits_checkpoint"
    image = np.random.default_rng(1).random((1, 36, 44, 3)).astype(np.float32)
    kwargs = {"prompt": "3", "image": image, "num_inference_steps": 4, "strength": 0.6, "output_type": "np"}
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(checkpoint, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref(generator=torch.Generator("cpu").manual_seed(5), **kwargs).images
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(resolve_builtin("digits"))
    pipe.set_progress_bar_config(disable=True)
    got = pipe(generator=5, **kwargs).images
    assert got.shape == expected.shape == (1, 36, 44, 3)
    assert float(np.abs(expected - got).max()) <= 1e-3


def test_a_too_small_image_names_image_and_the_packages_scale_factor(digits_img2img):
    digits_img2img.release_engines()
    for image in (np.zeros((1, 1, 3), np.float32), np.zeros((3, 40, 3), np.float32)):
        message = refused(digits_img2img, {"prompt": "1", "image": image}, "image", "4x4")
        assert "8" not in message.split("got")[0]
