"""TensorRT optimization profiles from requested image sizes. Pure Python: no TensorRT, no torch.

A request (`SizeRange`) is in the user's terms: images per call and pixel height / width, each as (min, opt, max).
`component_profiles` turns it into the (min, opt, max) shape of every input of one component, using the manifest's
input specs and checking the manifest's dimension ranges:

- unet: `sample` latents = pixels / VAE factor; batch doubled for classifier-free guidance (the pipeline runs
  [negative; positive] as one batch), its minimum left undoubled on a batch range so guidance 1 runs too;
  `encoder_hidden_states` sequence 77 x prompt chunks; SDXL `text_embeds` / `time_ids` and LCM `timestep_cond`
  follow the batch (their widths are fixed in the manifest).
- vae_decoder: `latent_sample` batch x latents; vae_encoder: `sample` batch x pixels.
- text encoders: `input_ids` batch x 77 (negative prompts run as a separate call of the same size).
- ControlNet residuals (a ControlNet's outputs, the UNet's extra inputs): the UNet's level-k feature maps,
  `height_k` = ceil(latent height / 2**k); a ControlNet's `controlnet_cond` image is in pixels (`image_height`),
  and its batch range keeps the undoubled minimum (guess mode runs it on the conditional half only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from diffrt.errors import ExportError, invalid
from diffrt.package.names import CONTROLNET_PREFIX
from diffrt.package.reader import ComponentInfo
from diffrt.package.tensorrt_records import Profile

Triple = tuple[int, int, int]
TEXT_LENGTH = 77  # CLIP's context; the UNet's sequence is a whole number of 77-token chunks
DEFAULT_BATCH: Triple = (1, 1, 4)
# How error messages name each argument; the CLI passes its option names instead.
PARAMETER_NAMES = {"static": "static", "min_size": "min_size", "opt_size": "opt_size", "max_size": "max_size",
                   "batch": "batch", "buckets": "buckets", "prompt_chunks": "prompt_chunks"}


@dataclass(frozen=True)
class SizeRange:
    """One requested profile: (min, opt, max) images per call, pixel height and pixel width.

    `batch_label` / `size_label` name the arguments it came from, for error messages.
    """

    batch: Triple
    height: Triple
    width: Triple
    batch_label: str = "batch"
    size_label: str = "size"

    def describe(self) -> str:
        def part(triple: Triple) -> str:
            low, opt, high = triple
            return str(low) if low == high else f"{low}..{high} (opt {opt})"

        return f"batch {part(self.batch)}, height {part(self.height)}, width {part(self.width)}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _pair(value: Any, label: str) -> tuple[int, int]:
    """A size: an int (square) or (height, width), positive ints."""
    pair = (value, value) if _positive_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_positive_int(v) for v in pair)):
        raise invalid(label, "a positive int or a (height, width) pair of positive ints (pixels)", value)
    return int(pair[0]), int(pair[1])


def _triple(value: Any, label: str) -> Triple:
    """A batch: an int (fixed) or (min, opt, max) with min <= opt <= max."""
    triple = (value,) * 3 if _positive_int(value) else value
    if not (isinstance(triple, (tuple, list)) and len(triple) == 3 and all(_positive_int(v) for v in triple)
            and triple[0] <= triple[1] <= triple[2]):
        raise invalid(label, "a positive int or (min, opt, max) positive ints with min <= opt <= max", value)
    return int(triple[0]), int(triple[1]), int(triple[2])


def _round(size: int, factor: int) -> int:
    return max(factor, size // factor * factor)


def _dynamic(min_size: Any, opt_size: Any, max_size: Any, batch: Triple, default: int, factor: int,
             names: Mapping[str, str]) -> SizeRange:
    """min / opt / max sizes, each defaulting around `default`: half of it, it, one and a half times it."""
    given = {key: _pair(value, names[key]) for key, value in
             (("min_size", min_size), ("opt_size", opt_size), ("max_size", max_size)) if value is not None}
    axes = []
    for axis in (0, 1):
        opt = given["opt_size"][axis] if "opt_size" in given else _round(default, factor)
        low = given["min_size"][axis] if "min_size" in given else min(opt, _round(default // 2, factor))
        high = given["max_size"][axis] if "max_size" in given else max(opt, _round(default * 3 // 2, factor))
        if "opt_size" not in given:
            opt = min(max(opt, low), high)
        if not low <= opt <= high:
            label = ", ".join(names[key] for key in ("min_size", "opt_size", "max_size") if key in given)
            raise invalid(label, "sizes with min <= opt <= max in height and in width",
                          {names[key]: pair for key, pair in given.items()})
        axes.append((low, opt, high))
    label = names["max_size" if "max_size" in given else "min_size" if "min_size" in given else "opt_size"]
    return SizeRange(batch, axes[0], axes[1], names["batch"], label)


def size_requests(*, static: Any = None, min_size: Any = None, opt_size: Any = None, max_size: Any = None,
                  batch: Any = None, buckets: Sequence[Any] | None = None, default_size: int, vae_scale_factor: int,
                  names: Mapping[str, str] | None = None) -> list[SizeRange]:
    """The requested profiles: `static` (batch, height, width) alone; or a dynamic range (min/opt/max sizes)
    and/or `buckets` of fixed (height, width), each with `batch`. Nothing given: a dynamic range around
    `default_size` (the UNet's sample size in pixels). Sizes must be multiples of the VAE factor."""
    names = {**PARAMETER_NAMES, **(names or {})}
    dynamic_given = any(v is not None for v in (min_size, opt_size, max_size))
    if static is not None:
        others = [names[k] for k, v in (("min_size", min_size), ("opt_size", opt_size), ("max_size", max_size),
                                        ("batch", batch), ("buckets", buckets)) if v is not None]
        if others:
            raise invalid(names["static"], f"used alone (it fixes batch and size; drop {', '.join(others)})", static)
        if not (isinstance(static, (tuple, list)) and len(static) == 3 and all(_positive_int(v) for v in static)):
            raise invalid(names["static"], "(batch, height, width) positive ints", static)
        b, h, w = (int(v) for v in static)
        requests = [SizeRange((b,) * 3, (h,) * 3, (w,) * 3, names["static"], names["static"])]
    else:
        batch_triple = _triple(batch, names["batch"]) if batch is not None else DEFAULT_BATCH
        if buckets is not None and (isinstance(buckets, (str, bytes)) or not list(buckets)):
            raise invalid(names["buckets"], "a non-empty list of (height, width) sizes", buckets)
        requests = []
        if dynamic_given or buckets is None:
            requests.append(_dynamic(min_size, opt_size, max_size, batch_triple, default_size, vae_scale_factor,
                                     names))
        for bucket in buckets or []:
            h, w = _pair(bucket, names["buckets"])
            requests.append(SizeRange(batch_triple, (h,) * 3, (w,) * 3, names["batch"], names["buckets"]))
    for request in requests:
        sizes = {*request.height, *request.width}
        if any(size % vae_scale_factor for size in sizes):
            raise invalid(request.size_label, f"multiples of {vae_scale_factor} pixels (the VAE's downscale factor)",
                          request.describe())
    return requests


def _batch(request: SizeRange, factor: int) -> Triple:
    """The engine batch for `factor` rows per image; a batch range keeps its minimum (guidance off still fits)."""
    low, opt, high = request.batch
    return (low * factor if low == high else low), opt * factor, high * factor


def _latent(triple: Triple, factor: int) -> Triple:
    return triple[0] // factor, triple[1] // factor, triple[2] // factor


def dimension_sizes(component: str, request: SizeRange, vae_scale_factor: int, cfg: bool,
                    prompt_chunks: int) -> dict[str, Triple]:
    """(min, opt, max) of each named dynamic dimension of `component` for `request`."""
    latent_h, latent_w = _latent(request.height, vae_scale_factor), _latent(request.width, vae_scale_factor)
    if component.startswith(("unet", CONTROLNET_PREFIX)):
        sequence = (TEXT_LENGTH, TEXT_LENGTH, TEXT_LENGTH * prompt_chunks)
        sizes = {"batch": _batch(request, 2 if cfg else 1), "height": latent_h, "width": latent_w,
                 "sequence": sequence, **_levels(latent_h, latent_w)}
        if component.startswith(CONTROLNET_PREFIX):
            low = request.batch[0]
            sizes.update(batch=(low, sizes["batch"][1], sizes["batch"][2]), image_height=request.height,
                         image_width=request.width)
        return sizes
    # VAE decoder: latent dims; VAE encoder: pixel dims; text encoders: the batch only.
    return {"batch": _batch(request, 1), "latent_height": latent_h, "latent_width": latent_w,
            "height": request.height, "width": request.width}


def _levels(latent_h: Triple, latent_w: Triple, deepest: int = 8) -> dict[str, Triple]:
    """`height_k` / `width_k`: the sides of the UNet's level-k feature maps (stride-2 convolutions round up)."""
    def down(triple: Triple, level: int) -> Triple:
        return tuple(-(-side // 2**level) for side in triple)

    return {f"{axis}_{level}": down(triple, level) for level in range(1, deepest + 1)
            for axis, triple in (("height", latent_h), ("width", latent_w))}


def _check_range(component: ComponentInfo, dim: str, triple: Triple, request: SizeRange, factor: int,
                 names: Mapping[str, str]) -> None:
    ranges = component.dim_ranges
    if dim not in ranges or ranges[dim][0] <= triple[0] and triple[2] <= ranges[dim][1]:
        return
    low, high = ranges[dim]
    label = {"batch": request.batch_label, "sequence": names["prompt_chunks"]}.get(dim, request.size_label)
    latent = dim.startswith("latent_") or (component.name.startswith("unet") and dim in ("height", "width"))
    unit = f" latents ({low * factor}..{high * factor} px)" if latent else ""
    got = f"{request.describe()}" if dim != "sequence" else f"{triple[2] // TEXT_LENGTH} chunks"
    raise invalid(label, f"within what `{component.name}` was exported for: `{dim}` in [{low}, {high}]{unit}",
                  f"{got} -> `{dim}` {triple[0]}..{triple[2]}")


def component_profiles(component: ComponentInfo, requests: Sequence[SizeRange], *, vae_scale_factor: int,
                       cfg: bool, prompt_chunks: int = 1, names: Mapping[str, str] | None = None) -> list[Profile]:
    """One profile per request (duplicates merged): input name -> (min, opt, max) shape."""
    names = {**PARAMETER_NAMES, **(names or {})}
    specs = component.inputs
    if specs is None:
        raise ExportError(f"`{component.name}` has no input specs in diffrt.json; TensorRT profiles need a package "
                          f"exported by diffrt (`diffrt export ... --target tensorrt`)")
    profiles: list[Profile] = []
    for request in requests:
        sizes = dimension_sizes(component.name, request, vae_scale_factor, cfg, prompt_chunks)
        profile: Profile = {}
        for spec in specs:
            shapes: list[list[int]] = [[], [], []]
            for dim in spec.shape:
                if isinstance(dim, int):
                    triple: Triple = (dim, dim, dim)
                elif dim in sizes:
                    triple = sizes[dim]
                    _check_range(component, dim, triple, request, vae_scale_factor, names)
                else:
                    raise ExportError(f"`{component.name}` input `{spec.name}` has dimension {dim!r}, which diffrt "
                                      f"cannot size from image sizes (known: {', '.join(sorted(sizes))})")
                for shape, size in zip(shapes, triple):
                    shape.append(size)
            profile[spec.name] = (tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2]))
        if profile not in profiles:
            profiles.append(profile)
    return profiles
