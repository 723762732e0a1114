"""What ControlNet adds to a call: its arguments (checked before any engine), the control images, and the
residuals each denoising step feeds the UNet. Diffusers' rules throughout (`pipeline_controlnet.py`).

- One ControlNet or several (multi-ControlNet): with several, `image`, `controlnet_conditioning_scale`,
  `control_guidance_start` / `_end` are lists, one entry per ControlNet (a single number applies to all).
- `control_guidance_start` / `_end`: a ControlNet steers only the steps i with start <= i / n and (i + 1) / n <=
  end; outside them its scale is 0, and diffrt skips running it (Diffusers runs it and multiplies by 0).
- `guess_mode` with classifier-free guidance: the ControlNet sees only the conditional half of the batch, its
  residuals are scaled by a 0.1..1 ramp from the first skip to the mid block, and the unconditional half gets zeros.
- Several ControlNets' residuals are summed, in order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from diffrt.errors import InputError, invalid
from diffrt.package.names import CONTROLNET_DOWN_OUTPUT, CONTROLNET_MID_OUTPUT, UNET_DOWN_RESIDUAL, UNET_MID_RESIDUAL
from diffrt.runtime.image import preprocess_control_image
from diffrt.runtime.pipelines import checks
from diffrt.runtime.pipelines.residuals import residual_specs, zero_residuals
from diffrt.runtime.pipelines.timestep import scalar_timestep

if TYPE_CHECKING:
    from diffrt.runtime.pipelines.base import DiffusionPipeline

# the UNet conditioning feeds a ControlNet also takes (SDXL's text_embeds / time_ids where it has them)
SHARED_FEEDS = ("encoder_hidden_states", "text_embeds", "time_ids")


@dataclass(frozen=True)
class ControlArguments:
    """A call's ControlNet arguments, one entry per ControlNet the pipeline runs."""

    images: list[Any]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool


def _per_net(name: str, value: Any, count: int) -> list[Any]:
    """A number for every ControlNet, or a list with one entry per ControlNet (Diffusers' rule)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise invalid(name, f"a number or a list of {count} (one per ControlNet)", value)
        return list(value)
    return [value] * count


def check_control_arguments(image: Any, count: int, scale: Any, start: Any, end: Any, guess_mode: Any,
                            image_name: str = "image") -> ControlArguments:
    """InputError naming the first bad ControlNet argument; the arguments as lists, one entry per ControlNet."""
    if image is None:
        raise InputError(f"`{image_name}` (the ControlNet conditioning image) is required")
    if count > 1:
        if not isinstance(image, (list, tuple)) or len(image) != count:
            raise invalid(image_name, f"a list of {count} images (one per ControlNet: multi-ControlNet)",
                          f"{type(image).__name__} of {len(image) if isinstance(image, (list, tuple)) else 1}")
        images = list(image)
    else:
        images = [image]
    scales = _per_net("controlnet_conditioning_scale", scale, count)
    for value in scales:
        checks.check_range("controlnet_conditioning_scale", value, 0.0)
    if isinstance(start, (list, tuple)) and not isinstance(end, (list, tuple)):
        end = [end] * len(start)
    elif isinstance(end, (list, tuple)) and not isinstance(start, (list, tuple)):
        start = [start] * len(end)
    starts = _per_net("control_guidance_start", start, count)
    ends = _per_net("control_guidance_end", end, count)
    for low, high in zip(starts, ends):
        checks.check_range("control_guidance_start", low, 0.0, 1.0)
        checks.check_range("control_guidance_end", high, 0.0, 1.0)
        if low >= high:
            raise invalid("control_guidance_start", f"smaller than control_guidance_end ({high})", low)
    if not isinstance(guess_mode, bool):
        raise invalid("guess_mode", "True or False", guess_mode)
    return ControlArguments(images, [float(s) for s in scales], [float(s) for s in starts], [float(e) for e in ends],
                            guess_mode)


def control_size(image: Any, vae_scale_factor: int, name: str = "image") -> tuple[int, int]:
    """The size a text-to-image ControlNet call runs at by default: the (first) control image's, snapped down."""
    from diffrt.runtime.image import input_image_size

    first = image[0] if isinstance(image, (list, tuple)) and image else image
    return input_image_size(first, vae_scale_factor, name)


def prepare_images(args: ControlArguments, height: int, width: int, vae_scale_factor: int, prompt_batch: int,
                   name: str = "image") -> list[np.ndarray]:
    """Each control image as NCHW [0, 1] at the call's size; a batch must be 1 or the prompt batch."""
    prepared = []
    for image in args.images:
        pixels = preprocess_control_image(image, height, width, vae_scale_factor=vae_scale_factor, name=name)
        if pixels.shape[0] not in (1, prompt_batch):
            raise invalid(name, f"a batch of 1 or of the prompt batch ({prompt_batch})", f"a batch of "
                          f"{pixels.shape[0]}")
        prepared.append(pixels)
    return prepared


def keep_schedule(args: ControlArguments, steps: int) -> list[list[float]]:
    """Per step, per ControlNet: 1.0 inside its control_guidance_start..end, else 0.0 (Diffusers' controlnet_keep)."""
    return [[1.0 - float(i / steps < low or (i + 1) / steps > high) for low, high in zip(args.starts, args.ends)]
            for i in range(steps)]


@dataclass
class ControlStep:
    """One call's ControlNet runner: `__call__(i, t, latents, feeds)` gives the UNet's residual feeds for step i."""

    pipeline: "DiffusionPipeline"
    names: list[str]
    args: ControlArguments
    images: list[np.ndarray]  # per ControlNet, NCHW [0, 1], tiled to the batch (CFG-doubled unless guess mode)
    keep: list[list[float]]
    do_cfg: bool
    global_pool: list[bool] = field(default_factory=list)

    def __call__(self, i: int, t: Any, latents: np.ndarray, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unet_specs = residual_specs(self.pipeline.engine("unet").inputs)
        total: list[np.ndarray] | None = None
        half = self.args.guess_mode and self.do_cfg
        for k, name in enumerate(self.names):
            scale = self.args.scales[k] * self.keep[min(i, len(self.keep) - 1)][k]
            if scale == 0.0:  # outside its guidance window (or scale 0): it would add zeros
                continue
            residuals = self._run(name, k, latents, feeds, half, scale, i)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        if total is None:
            return zero_residuals(unet_specs, latents.shape)
        if half:  # the unconditional half of the batch gets no control (Diffusers' guess mode)
            total = [np.concatenate([np.zeros_like(r), r]) for r in total]
        return {_unet_name(j, len(total)): residual for j, residual in enumerate(total)}

    def _run(self, name: str, k: int, latents: np.ndarray, feeds: dict[str, np.ndarray], half: bool,
             scale: float, i: int) -> list[np.ndarray]:
        engine = self.pipeline.engine(name)
        rows = slice(latents.shape[0] // 2, None) if half else slice(None)
        control = {key: feeds[key][rows] for key in SHARED_FEEDS if key in feeds}
        control.update(sample=latents[rows], timestep=feeds["timestep"][rows], controlnet_cond=self.images[k])
        dtypes = {spec.name: spec.dtype for spec in engine.inputs}
        control = {key: value.astype(dtypes[key], copy=False) for key, value in control.items() if key in dtypes}
        out = engine.run(scalar_timestep(engine, control), release_memory=self.pipeline.last_step(i))
        count = sum(1 for spec in engine.outputs if spec.name.startswith(CONTROLNET_DOWN_OUTPUT.split("{")[0]))
        residuals = [np.asarray(out[CONTROLNET_DOWN_OUTPUT.format(j)], np.float32) for j in range(count)]
        residuals.append(np.asarray(out[CONTROLNET_MID_OUTPUT], np.float32))
        if self.args.guess_mode and not self.global_pool[k]:
            # torch.logspace(-1, 0, n + 1): 0.1 for the first skip up to 1.0 for the mid block
            ramp = np.logspace(-1, 0, len(residuals), dtype=np.float32) * np.float32(scale)
            residuals = [r * s for r, s in zip(residuals, ramp)]
        else:
            residuals = [r * np.float32(scale) for r in residuals]
        if self.global_pool[k]:  # the ControlNet conditions globally: its mean over space, broadcast back
            residuals = [np.broadcast_to(r.mean(axis=(2, 3), keepdims=True), r.shape) for r in residuals]
        return residuals


def _unet_name(j: int, count: int) -> str:
    return UNET_MID_RESIDUAL if j == count - 1 else UNET_DOWN_RESIDUAL.format(j)


def tile_control_images(images: list[np.ndarray], batch: int, do_cfg: bool, guess_mode: bool) -> list[np.ndarray]:
    """Diffusers' prepare_image: a 1-image batch repeats to the whole batch, a prompt-batch one repeats each image
    per image of its prompt (repeat_interleave); doubled for classifier-free guidance unless in guess mode."""
    tiled = []
    for image in images:
        repeated = np.repeat(image, math.ceil(batch / image.shape[0]), axis=0)[:batch]
        tiled.append(np.concatenate([repeated, repeated]) if do_cfg and not guess_mode else repeated)
    return tiled


def check_controlnet_selection(available: Sequence[str], selection: Any) -> list[str]:
    """The package ControlNets a pipeline runs: `selection` (a name or list of names) or all of them, in order."""
    if not available:
        raise InputError("this package has no ControlNet: export one with `diffrt export SRC OUT --controlnet CN` "
                         "or add one with `diffrt export --controlnet CN --into PACKAGE`")
    if selection is None:
        return list(available)
    names = [selection] if isinstance(selection, str) else selection
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise invalid("controlnet", f"a ControlNet name or a list of names from {', '.join(available)}", selection)
    for name in names:
        if name not in available:
            raise invalid("controlnet", f"one of this package's ControlNets ({', '.join(available)})", name)
    return list(names)
