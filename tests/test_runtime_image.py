"""Image pre/post-processing against Diffusers' VaeImageProcessor (the oracle), on PIL images and numpy arrays."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffrt.errors import InputError
from diffrt.runtime.image import (
    numpy_to_pil,
    pil_to_numpy,
    postprocess,
    preprocess_image,
    preprocess_mask,
    resize_nearest,
    to_pil,
)

torch = pytest.importorskip("torch")
image_processor = pytest.importorskip("diffusers.image_processor")

ATOL = 1e-6  # numpy paths; PIL resizing is Pillow's in both, so those results are identical


@pytest.fixture(scope="module")
def processor():
    return image_processor.VaeImageProcessor(vae_scale_factor=8)


@pytest.fixture(scope="module")
def mask_processor():
    # What the SD / SDXL inpainting pipelines build.
    return image_processor.VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True
    )


def random_pil(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=None)


def random_array(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def assert_matches(got: np.ndarray, expected: torch.Tensor) -> None:
    expected_np = expected.numpy()
    assert got.dtype == np.float32 and got.shape == expected_np.shape
    np.testing.assert_allclose(got, expected_np, rtol=0, atol=ATOL)


# ----- images -----
@pytest.mark.parametrize("size", [None, (64, 48), (40, 72), (100, 30)])
@pytest.mark.parametrize("resize_mode", ["default", "fill", "crop"])
def test_pil_images_match_vae_image_processor(processor, size, resize_mode: str) -> None:
    image = random_pil(70, 53)
    height, width = size or (None, None)
    expected = processor.preprocess(image, height=height, width=width, resize_mode=resize_mode)
    got = preprocess_image(image, height, width, resize_mode=resize_mode)
    assert_matches(got, expected)
    assert -1.0 <= got.min() and got.max() <= 1.0


@pytest.mark.parametrize("resample", ["lanczos", "bicubic", "bilinear", "nearest"])
def test_resample_filters_match(resample: str) -> None:
    processor = image_processor.VaeImageProcessor(vae_scale_factor=8, resample=resample)
    image = random_pil(61, 83, seed=1)
    assert_matches(preprocess_image(image, 32, 48, resample=resample), processor.preprocess(image, 32, 48))


def test_pil_lists_and_crops_match(processor) -> None:
    images = [random_pil(64, 64, seed=2), random_pil(50, 90, seed=3)]  # the second is resized to the first's size
    assert_matches(preprocess_image(images), processor.preprocess(images))
    crop = (5, 7, 60, 49)
    assert_matches(preprocess_image(images, 32, 40, crops_coords=crop),
                   processor.preprocess(images, 32, 40, crops_coords=crop))


@pytest.mark.parametrize(
    "shape, size",
    [((37, 45, 3), None), ((2, 37, 45, 3), None), ((2, 16, 24, 3), (64, 48)), ((1, 80, 80, 3), (24, 40)),
     ((1, 72, 90, 3), (72, 90)), ((3, 32, 32, 3), (32, 32))],
)
def test_numpy_images_match_vae_image_processor(processor, shape, size) -> None:
    array = random_array(shape, seed=len(shape))
    height, width = size or (None, None)
    assert_matches(preprocess_image(array, height, width), processor.preprocess(array, height, width))


def test_numpy_lists_and_minus_one_to_one_inputs_match(processor) -> None:
    arrays = [random_array((24, 40, 3), seed=i) for i in range(3)]
    assert_matches(preprocess_image(arrays), processor.preprocess(arrays))
    normalized = random_array((1, 16, 16, 3)) * 2 - 1  # Diffusers takes [-1, 1] as already normalised
    with pytest.warns(FutureWarning):
        expected = processor.preprocess(normalized)
    assert_matches(preprocess_image(normalized), expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 90), st.integers(1, 90))
def test_nearest_resize_matches_torch_interpolate(h_in: int, w_in: int, h_out: int, w_out: int) -> None:
    array = random_array((1, 2, h_in, w_in))
    expected = torch.nn.functional.interpolate(torch.from_numpy(array), size=(h_out, w_out)).numpy()
    np.testing.assert_array_equal(resize_nearest(array, h_out, w_out), expected)


# ----- masks -----
@pytest.mark.parametrize("shape", [(45, 61), (2, 45, 61), (45, 61, 1), (1, 45, 61, 1)])
@pytest.mark.parametrize("size", [None, (64, 48)])
def test_numpy_masks_match_the_inpaint_mask_processor(mask_processor, shape, size) -> None:
    mask = random_array(shape, seed=4)
    height, width = size or (None, None)
    got = preprocess_mask(mask, height, width)
    assert_matches(got, mask_processor.preprocess(mask, height, width))
    assert got.shape[1] == 1 and set(np.unique(got)) <= {0.0, 1.0}


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pil_masks_of_any_mode_match(mask_processor, mode: str) -> None:
    masks = [random_pil(50, 70, seed=5, mode=mode), random_pil(60, 60, seed=6, mode=mode)]
    assert_matches(preprocess_mask(masks, 48, 64), mask_processor.preprocess(masks, 48, 64))
    assert_matches(preprocess_mask(masks[0]), mask_processor.preprocess(masks[0]))


# ----- outputs and conversions -----
def test_postprocess_matches_for_np_and_pil(processor) -> None:
    decoded = (np.random.default_rng(7).standard_normal((2, 3, 16, 24)) * 0.8).astype(np.float32)
    expected = processor.postprocess(torch.from_numpy(decoded), output_type="np")
    got = postprocess(decoded, output_type="np")
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert got.shape == (2, 16, 24, 3) and got.min() >= 0 and got.max() <= 1
    pil = postprocess(decoded)
    reference = processor.postprocess(torch.from_numpy(decoded), output_type="pil")
    assert [im.size for im in pil] == [(24, 16)] * 2
    for ours, theirs in zip(pil, reference):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_conversions_match_vae_image_processor(processor) -> None:
    batch = random_array((2, 8, 12, 3))
    for ours, theirs in zip(numpy_to_pil(batch), processor.numpy_to_pil(batch)):
        assert ours.mode == theirs.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    gray = numpy_to_pil(random_array((8, 12, 1)))
    assert gray[0].mode == "L" and gray[0].size == (12, 8)
    images = [random_pil(8, 12, seed=s) for s in range(2)]
    np.testing.assert_array_equal(pil_to_numpy(images), processor.pil_to_numpy(images))


def test_to_pil_accepts_one_image_in_common_layouts() -> None:
    pixels = np.random.default_rng(8).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_pil(pixels)), pixels)
    np.testing.assert_array_equal(np.asarray(to_pil(pixels[None] / np.float32(255))), pixels)
    assert to_pil(pixels[..., 0]).mode == "L"
    image = Image.fromarray(pixels)
    assert to_pil(image) is image


# ----- validation: each error names the argument -----
pil, arr, pre, pre_mask = random_pil, random_array, preprocess_image, preprocess_mask
ZEROS = np.zeros((1, 3, 8, 8), np.float32)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pre(pil(16, 16, mode="RGBA")), r"`image` must be an RGB PIL image .*; got 'mode RGBA'"),
        (lambda: pre(pil(16, 16, mode="L")), r"`image` must be an RGB PIL image"),
        (lambda: pre(np.zeros((16, 16, 3), np.uint8)), r"`image` must be a float array with values in \[-1, 1\]"),
        (lambda: pre(arr((16, 16, 3)) * 3), r"`image` must be in \[-1, 1\]; got .values in \[0"),
        (lambda: pre(arr((16, 16, 4))), r"`image` must be an array with 3 \(RGB\) channels last .*; got 'shape"),
        (lambda: pre(arr((16, 16, 3)), resize_mode="fill"), r"`resize_mode` must be 'default' for numpy inputs"),
        (lambda: pre(pil(16, 16), resize_mode="stretch"), r"`resize_mode` must be one of default, fill, crop"),
        (lambda: pre(pil(16, 16), resample="box"), r"`resample` must be one of nearest, linear"),
        (lambda: pre(pil(16, 16), height=4), r"`height` must be at least 8 \(the VAE scale factor\); got 4"),
        (lambda: pre(pil(16, 5)), r"`image` must be at least 8x8 pixels \(the VAE scale factor of this package\); "
                                  r"got '16x5 \(height x width\)'"),
        (lambda: pre(pil(16, 16), width=-8), r"`width` must be None or a positive integer; got -8"),
        (lambda: pre([]), r"`image` must be an image or a non-empty list of images"),
        (lambda: pre([pil(8, 8), arr((8, 8, 3))]), r"`image` must be a PIL image, a numpy"),
        (lambda: pre("cat.png"), r"`image` must be a PIL image, a numpy HWC / NHWC array"),
        (lambda: pre(arr((16, 16, 3)), crops_coords=(0, 0, 8, 8)), r"`crops_coords` applies to PIL images only"),
        (lambda: pre_mask(arr((16, 16)) + 1), r"`mask` must be in \[0, 1\]; got .values in \[1"),
        (lambda: pre_mask(arr((16, 16, 3))[None]), r"`mask` must be a single-channel \(grayscale\) mask"),
        (lambda: postprocess(ZEROS, output_type="pt"), r"`output_type` must be one of pil, np; got 'pt'"),
        (lambda: postprocess(ZEROS[0]), r"`images` must be a float NCHW array; got 'shape \(3, 8, 8\)"),
        (lambda: numpy_to_pil(np.zeros((2, 8, 8, 5))), r"`images` must be an HWC or NHWC array with 1, 3 or 4"),
    ],
)
def test_invalid_inputs_raise_input_error_naming_the_argument(call, message: str) -> None:
    with pytest.raises(InputError, match=message):
        call()
