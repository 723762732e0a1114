"""Images in and out of a pipeline, as Diffusers' `VaeImageProcessor` prepares them, on NumPy and Pillow only.

- `preprocess_image`: PIL images (RGB) or float arrays HWC / NHWC in [0, 1] -> NCHW float32 in [-1, 1]; sizes
  snap down to a multiple of the VAE scale factor; PIL images are resized with Pillow (Lanczos by default), arrays
  with torch's default nearest-neighbour rule, so results match Diffusers bit for bit.
- `preprocess_mask`: the inpainting mask: grayscale, resized the same way, binarised at 0.5 -> NCHW {0, 1}.
- `postprocess`: decoder output NCHW in [-1, 1] -> PIL images or NHWC float32 in [0, 1].
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
from PIL import Image

from diffrt.errors import InputError, invalid

logger = logging.getLogger(__name__)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
RESIZE_MODES = ("default", "fill", "crop")
OUTPUT_TYPES = ("pil", "np")
ImageInput = Image.Image | np.ndarray | Sequence[Image.Image] | Sequence[np.ndarray]


# ----- conversions -----
def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """HWC or NHWC floats in [0, 1] -> PIL images (one channel -> mode "L")."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None, ...]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise invalid("images", "an HWC or NHWC array with 1, 3 or 4 channels", f"shape {images.shape}")
    pixels = (images * 255).round().astype(np.uint8)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0]) for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def pil_to_numpy(images: Image.Image | Sequence[Image.Image]) -> np.ndarray:
    """PIL image(s) of one size -> NHWC (or NHW for one-channel modes) float32 in [0, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    return np.stack([np.array(image).astype(np.float32) / 255.0 for image in images], axis=0)


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """One image as PIL: a PIL image as is, or an HW / HWC / 1HWC array (floats in [0, 1] or uint8)."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise invalid("image", "a PIL image or an HW / HWC / 1HWC array", f"shape {array.shape}")
    if array.dtype == np.uint8:
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    _check_float_range("image", array, 0.0, 1.0)
    return numpy_to_pil(array)[0]


# ----- resizing -----
def snap_size(height: int, width: int, vae_scale_factor: int, source: str | None = None) -> tuple[int, int]:
    """Height and width rounded down to a multiple of the VAE scale factor (Diffusers' default-size rule).
    `source` names the argument the size was read from (an image), which the error then names."""
    if source is not None and min(height, width) < vae_scale_factor:
        raise invalid(source, f"at least {vae_scale_factor}x{vae_scale_factor} pixels (the VAE scale factor of "
                      "this package)", f"{height}x{width} (height x width)")
    for name, value in (("height", height), ("width", width)):
        if value - value % vae_scale_factor < vae_scale_factor:
            raise invalid(name, f"at least {vae_scale_factor} (the VAE scale factor)", value)
    return height - height % vae_scale_factor, width - width % vae_scale_factor


def _check_given_size(height: int | None, width: int | None, vae_scale_factor: int) -> None:
    """An explicit `height` / `width` too small is the user's argument, named as such (not the image's size)."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and value - value % vae_scale_factor < vae_scale_factor:
            raise invalid(name, f"at least {vae_scale_factor} (the VAE scale factor)", value)


def input_image_size(image: Any, vae_scale_factor: int, name: str = "image") -> tuple[int, int]:
    """The (height, width) a pipeline runs `image` at (its first image's size snapped down to a multiple of the
    VAE scale factor), read without converting any pixel: sizes are checked before the work."""
    first = _as_list(name, image)[0]
    if isinstance(first, Image.Image):
        height, width = first.height, first.width
    else:
        height, width = first.shape[-3:-1] if first.ndim >= 3 else first.shape
    return snap_size(int(height), int(width), vae_scale_factor, name)


def resize_nearest(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """NCHW nearest-neighbour resize with torch's index rule (`F.interpolate(x, size)` with its default mode)."""
    rows = _nearest_index(images.shape[2], height)
    cols = _nearest_index(images.shape[3], width)
    return images[:, :, rows][:, :, :, cols]


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    # torch computes the source index in float32: floor(dst * (in / out)), clamped to the last pixel.
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


def _resize_fill(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """Fit inside (width, height) keeping the aspect ratio; stretch the edge rows / columns into the margins."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=resample)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            edge = (0, resized.height, width, resized.height)
            out.paste(resized.resize((width, fill), box=edge), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            edge = (resized.width, 0, resized.width, height)
            out.paste(resized.resize((fill, height), box=edge), box=(fill + src_w, 0))
    return out


def _resize_crop(image: Image.Image, width: int, height: int, resample: Image.Resampling) -> Image.Image:
    """Cover (width, height) keeping the aspect ratio and cut the centre."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=resample)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def _resize_pil(image: Image.Image, height: int, width: int, resample: str, mode: str) -> Image.Image:
    if mode == "fill":
        return _resize_fill(image, width, height, RESAMPLE[resample])
    if mode == "crop":
        return _resize_crop(image, width, height, RESAMPLE[resample])
    return image.resize((width, height), resample=RESAMPLE[resample])


# ----- validation -----
def _check_float_range(name: str, array: np.ndarray, low: float, high: float) -> None:
    if array.dtype.kind != "f":
        raise invalid(name, f"a float array with values in [{low:g}, {high:g}] (divide uint8 by 255)", str(array.dtype))
    if array.size and not (np.all(np.isfinite(array)) and array.min() >= low and array.max() <= high):
        raise invalid(name, f"in [{low:g}, {high:g}]", f"values in [{array.min():.4g}, {array.max():.4g}]")


def _check_options(height: Any, width: Any, resample: str, resize_mode: str, vae_scale_factor: Any) -> None:
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
            raise invalid(name, "None or a positive integer", value)
    if resample not in RESAMPLE:
        raise invalid("resample", f"one of {', '.join(RESAMPLE)}", resample)
    if resize_mode not in RESIZE_MODES:
        raise invalid("resize_mode", f"one of {', '.join(RESIZE_MODES)}", resize_mode)
    if not isinstance(vae_scale_factor, int) or vae_scale_factor < 1:
        raise invalid("vae_scale_factor", "a positive integer", vae_scale_factor)


def _as_list(name: str, image: Any) -> list[Any]:
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise invalid(name, "an image or a non-empty list of images", image)
    if all(isinstance(item, Image.Image) for item in items):
        return items
    if all(isinstance(item, np.ndarray) and item.ndim in (2, 3, 4) for item in items):
        return items
    kinds = sorted({type(item).__name__ for item in items})
    raise invalid(name, "a PIL image, a numpy HWC / NHWC array, or a list of one of these", f"a {', '.join(kinds)}")


# ----- pipelines' entry points -----
def _pil_batch(
    name: str, images: list[Image.Image], height: int | None, width: int | None, vae_scale_factor: int,
    resample: str, resize_mode: str, crops_coords: tuple[int, int, int, int] | None, grayscale: bool,
) -> np.ndarray:
    if crops_coords is not None:
        images = [image.crop(crops_coords) for image in images]
    _check_given_size(height, width, vae_scale_factor)
    height, width = snap_size(height or images[0].height, width or images[0].width, vae_scale_factor,
                              name if height is None or width is None else None)
    images = [_resize_pil(image, height, width, resample, resize_mode) for image in images]
    if grayscale:
        images = [image.convert("L") for image in images]
    array = pil_to_numpy(images)
    return _nhwc_to_nchw(array)


def _numpy_batch(
    name: str, arrays: list[np.ndarray], height: int | None, width: int | None, vae_scale_factor: int, grayscale: bool
) -> np.ndarray:
    if grayscale:  # a 3-D mask is [batch, H, W] unless its last axis is a single channel (Diffusers' rule)
        arrays = [(a[None] if a.shape[-1] == 1 else a[..., None]) if a.ndim == 3 else a for a in arrays]
    try:
        array = np.concatenate(arrays, axis=0) if arrays[0].ndim == 4 else np.stack(arrays, axis=0)
    except ValueError as error:
        raise invalid(name, "images of one shape", [a.shape for a in arrays]) from error
    images = _nhwc_to_nchw(array)
    _check_given_size(height, width, vae_scale_factor)
    height, width = snap_size(height or images.shape[2], width or images.shape[3], vae_scale_factor,
                              name if height is None or width is None else None)
    return resize_nearest(images, height, width)


def _nhwc_to_nchw(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., None]
    return np.ascontiguousarray(array.transpose(0, 3, 1, 2))


def preprocess_image(
    image: ImageInput,
    height: int | None = None,
    width: int | None = None,
    *,
    vae_scale_factor: int = 8,
    resample: str = "lanczos",
    resize_mode: str = "default",
    crops_coords: tuple[int, int, int, int] | None = None,
    name: str = "image",
) -> np.ndarray:
    """Image(s) for the VAE encoder: NCHW float32 in [-1, 1] (Diffusers' `VaeImageProcessor.preprocess`).

    `height` / `width` default to the first image's size; both snap down to a multiple of `vae_scale_factor`.
    `resize_mode` "fill" / "crop" and `crops_coords` apply to PIL images only, as in Diffusers. Errors name the
    argument `name` (the pipeline's parameter the image came in).
    """
    _check_options(height, width, resample, resize_mode, vae_scale_factor)
    items = _as_list(name, image)
    if isinstance(items[0], Image.Image):
        for item in items:
            if item.mode != "RGB":
                raise invalid(name, "an RGB PIL image (use image.convert('RGB'))", f"mode {item.mode}")
        pixels = _pil_batch(name, items, height, width, vae_scale_factor, resample, resize_mode, crops_coords,
                            grayscale=False)
    else:
        _check_numpy_only(resize_mode, crops_coords)
        for item in items:
            _check_float_range(name, item, -1.0, 1.0)
            if item.shape[-1] != 3:
                raise invalid(name, "an array with 3 (RGB) channels last (HWC / NHWC)", f"shape {item.shape}")
        pixels = _numpy_batch(name, items, height, width, vae_scale_factor, grayscale=False)
    if pixels.min() < 0:  # already in [-1, 1]: Diffusers accepts it (deprecated) and skips normalisation
        logger.warning("`%s` has values below 0: taking it as already in [-1, 1]; pass [0, 1] images instead", name)
        return pixels.astype(np.float32, copy=False)
    return (2.0 * pixels - 1.0).astype(np.float32, copy=False)


def preprocess_mask(
    mask: ImageInput,
    height: int | None = None,
    width: int | None = None,
    *,
    vae_scale_factor: int = 8,
    resample: str = "lanczos",
    resize_mode: str = "default",
    crops_coords: tuple[int, int, int, int] | None = None,
    name: str = "mask",
) -> np.ndarray:
    """Inpainting mask(s): NCHW float32 [batch, 1, H, W] with 1 where to repaint (binarised at 0.5).

    PIL masks of any mode are converted to grayscale; arrays are HW, NHW, HW1 or NHW1 floats in [0, 1]. Errors
    name the argument `name` (pipelines pass "mask_image").
    """
    _check_options(height, width, resample, resize_mode, vae_scale_factor)
    items = _as_list(name, mask)
    if isinstance(items[0], Image.Image):
        pixels = _pil_batch(name, items, height, width, vae_scale_factor, resample, resize_mode, crops_coords,
                            grayscale=True)
    else:
        _check_numpy_only(resize_mode, crops_coords)
        for item in items:
            _check_float_range(name, item, 0.0, 1.0)
        pixels = _numpy_batch(name, items, height, width, vae_scale_factor, grayscale=True)
    if pixels.shape[1] != 1:
        raise invalid(name, "a single-channel (grayscale) mask", f"{pixels.shape[1]} channels")
    return (pixels >= 0.5).astype(np.float32)


def _check_numpy_only(resize_mode: str, crops_coords: Any) -> None:
    if resize_mode != "default":
        raise invalid("resize_mode", "'default' for numpy inputs ('fill' and 'crop' need PIL images)", resize_mode)
    if crops_coords is not None:
        raise InputError("`crops_coords` applies to PIL images only; crop the array before passing it")


def postprocess(images: np.ndarray, output_type: str = "pil") -> list[Image.Image] | np.ndarray:
    """Decoder output NCHW in [-1, 1] -> PIL images, or NHWC float32 in [0, 1] for `output_type="np"`."""
    if output_type not in OUTPUT_TYPES:
        raise invalid("output_type", f"one of {', '.join(OUTPUT_TYPES)}", output_type)
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype.kind != "f":
        got = f"shape {images.shape}, {images.dtype}" if isinstance(images, np.ndarray) else type(images).__name__
        raise invalid("images", "a float NCHW array", got)
    pixels = np.clip(images.astype(np.float32, copy=False) * 0.5 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return numpy_to_pil(pixels) if output_type == "pil" else pixels


def preprocess_control_image(image: ImageInput, height: int | None = None, width: int | None = None, *,
                             vae_scale_factor: int = 8, name: str = "image") -> np.ndarray:
    """A ControlNet's conditioning image(s): NCHW float32 in [0, 1] at (height, width), as Diffusers' control image
    processor gives them (`VaeImageProcessor(do_convert_rgb=True, do_normalize=False)`): PIL images converted to
    RGB and resized with Lanczos, arrays (HWC / NHWC in [0, 1]) resized nearest."""
    _check_options(height, width, "lanczos", "default", vae_scale_factor)
    items = _as_list(name, image)
    if isinstance(items[0], Image.Image):
        items = [item.convert("RGB") for item in items]
        return _pil_batch(name, items, height, width, vae_scale_factor, "lanczos", "default", None,
                          grayscale=False).astype(np.float32, copy=False)
    for item in items:
        _check_float_range(name, item, 0.0, 1.0)
        if item.shape[-1] != 3:
            raise invalid(name, "an array with 3 (RGB) channels last (HWC / NHWC)", f"shape {item.shape}")
    return _numpy_batch(name, items, height, width, vae_scale_factor, grayscale=False).astype(np.float32, copy=False)
