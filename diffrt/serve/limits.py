"""Limits and values checked before a request is queued, each error naming the request's own field."""
from __future__ import annotations

import io
import math
import re

from PIL import Image

from diffrt.errors import InputError
from diffrt.runtime.image_files import read_image
from diffrt.serve.config import ServeConfig
from diffrt.serve.jobs import GenerationRequest, ServeError
from diffrt.serve.packages import PackageInfo


def bad(param: str, message: str, status: int = 400) -> ServeError:
    return ServeError(status, f"`{param}` {message}", param=param, code="invalid_value")


def parse_size(text: str, param: str = "size") -> tuple[int, int]:
    """OpenAI's "WIDTHxHEIGHT" -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text or "")
    if match is None:
        raise bad(param, f"must be WIDTHxHEIGHT, e.g. 512x512; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def check_request(request: GenerationRequest, info: PackageInfo, config: ServeConfig, names: dict[str, str]) -> None:
    """Everything a request can get wrong, before it costs any work. `names` maps our fields to the API's names
    (width, height, steps, images, prompt, negative_prompt, guidance, scheduler, strength, deep_cache). Settles
    `request.deep_cache`: the interval the request runs with (its own or the server's), or None."""
    width, height = request.width, request.height
    for field, value in (("width", width), ("height", height)):
        if value < info.size_multiple or value % info.size_multiple:
            raise bad(names[field], f"must be a positive multiple of {info.size_multiple} (the VAE's downsampling "
                      f"factor); got {value}")
    if width * height > config.max_pixels:
        raise bad(names["width"], f"x `{names['height']}` = {width}x{height} = {width * height} pixels is more than "
                  f"this server's limit of {config.max_pixels} (--max-pixels)")
    if not 1 <= request.steps <= config.max_steps:
        raise bad(names["steps"], f"must be in [1, {config.max_steps}] (--max-steps); got {request.steps}")
    most = min(config.max_images, info.max_rows)
    if not 1 <= request.rows <= most:
        why = "--max-images" if most == config.max_images else "the most this package's UNet takes at once"
        raise bad(names["images"], f"must give 1 to {most} images ({why}); got {request.rows}")
    for field, texts in (("prompt", request.prompts), ("negative_prompt", request.negative_prompts)):
        longest = max((len(text) for text in texts), default=0)
        if longest > config.max_prompt_chars:
            raise bad(names[field], f"is {longest} characters long; the limit is {config.max_prompt_chars}")
    if not math.isfinite(request.guidance) or request.guidance < 0:
        raise bad(names["guidance"], f"must be a finite number >= 0; got {request.guidance}")
    if request.strength is not None and not (0 < request.strength <= 1):
        raise bad(names["strength"], f"must be in (0, 1]; got {request.strength}")
    if request.scheduler is not None:
        _check_scheduler(request.scheduler, info, names["scheduler"])
    request.deep_cache = _deep_cache(request, info, config, names["deep_cache"])


def _deep_cache(request: GenerationRequest, info: PackageInfo, config: ServeConfig, param: str) -> int | None:
    """The request's DeepCache interval, N >= 2 or None (off): its own `param`, else the server's --deep-cache where
    the package has DeepCache's shallow UNet and the request runs no ControlNet (the two do not combine)."""
    asked = request.deep_cache
    exported = info.pipe.package.deep_cache_branch is not None
    if asked is None:
        default = config.deep_cache
        return default if default and default > 1 and exported and request.controlnet is None else None
    if not 1 <= asked <= config.max_steps:
        raise bad(param, f"must be in [1, {config.max_steps}] (1: off; N: the full UNet every N steps); got {asked}")
    if asked == 1:
        return None
    if not exported:
        raise bad(param, f"needs a package exported with DeepCache (`diffrt export ... --deep-cache`); "
                  f"{info.name!r} has none")
    if request.controlnet is not None:
        raise bad(param, "does not combine with ControlNet units (they add to the UNet's skip connections at every "
                  "step, which DeepCache's cached features would drop)")
    return asked


def _check_scheduler(name: str, info: PackageInfo, param: str) -> None:
    from diffrt.runtime.generation import scheduler_for

    try:
        scheduler_for(info.pipe.package.scheduler_config, name)
    except ValueError as error:
        raise bad(param, f"is not a scheduler diffrt can use here: {error}") from None


def check_upload(data: bytes, param: str, config: ServeConfig) -> None:
    if len(data) > config.max_upload_bytes:
        raise bad(param, f"is {len(data)} bytes; the limit is {config.max_upload_bytes}", status=413)


def decode_upload(data: bytes, param: str, mode: str) -> Image.Image:
    """An uploaded image, decoded safely (no decompression bombs); 400 naming `param` when it is no image."""
    try:
        return read_image(io.BytesIO(data), f"`{param}`", mode)
    except InputError as error:
        raise ServeError(400, str(error), param=param, code="invalid_image") from None
