"""Align Your Steps schedules (Sabour, Fidler & Kreis 2024, "Align Your Steps: Optimizing Sampling Schedules in
Diffusion Models"): the published 10-step lists (Diffusers' ``AysSchedules``, same keys and values) and their
log-linear interpolation to any step count, as the paper's reference code does."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import invalid
from .base import alphas_cumprod_from_config, sigma_to_t, sigmas_from_alphas_cumprod

AysSchedules: dict[str, list[float]] = {
    "StableDiffusionTimesteps": [999, 850, 736, 645, 545, 455, 343, 233, 124, 24],
    "StableDiffusionSigmas": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0],
    "StableDiffusionXLTimesteps": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13],
    "StableDiffusionXLSigmas": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0],
    "StableDiffusionVideoSigmas": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.0],
}
MODELS = ("StableDiffusion", "StableDiffusionXL", "StableDiffusionVideo")

# SD 1.x/2.x and SDXL share this training schedule; AYS timesteps are its sigma -> t map, rounded (checked in tests)
_SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear"}


class AysSchedule(NamedTuple):
    """``sigmas``: n + 1 values ending in 0 (pass as ``sigmas=``). ``timesteps``: n integer timesteps for
    schedulers that take ``timesteps=``, or None for video (SVD is trained on continuous EDM sigmas)."""

    sigmas: np.ndarray
    timesteps: np.ndarray | None


def loglinear_interp(values: np.ndarray, num_steps: int) -> np.ndarray:
    """Resample a descending positive sequence to ``num_steps`` points, linearly in log space (AYS code).
    One point is the first value: the AYS code would return the last, a one-step schedule that starts
    almost clean."""
    if num_steps == 1:
        return np.asarray(values[:1], dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    xs = np.linspace(0, 1, len(values))
    result = np.exp(np.interp(np.linspace(0, 1, num_steps), xs, np.log(values[::-1])))[::-1].copy()
    result[0], result[-1] = values[0], values[-1]  # exp(log(x)) may miss x by an ulp: keep the ends exact
    return result


def ays_schedule(model: str, num_inference_steps: int = 10) -> AysSchedule:
    """The AYS schedule of ``model`` ("StableDiffusion", "StableDiffusionXL" or "StableDiffusionVideo") for
    any step count: the published lists at 10 steps; otherwise the non-zero sigmas resampled log-linearly
    (final 0 kept) and timesteps mapped from them through the model's training sigma table."""
    if model not in MODELS:
        raise invalid("model", "one of " + ", ".join(map(repr, MODELS)), model)
    if (not isinstance(num_inference_steps, (int, np.integer)) or isinstance(num_inference_steps, bool)
            or num_inference_steps < 1):
        raise invalid("num_inference_steps", "an int >= 1", num_inference_steps)
    published = np.array(AysSchedules[f"{model}Sigmas"], dtype=np.float64)
    published_t = AysSchedules.get(f"{model}Timesteps")
    if num_inference_steps == len(published) - 1:
        timesteps = None if published_t is None else np.array(published_t, dtype=np.int64)
        return AysSchedule(published, timesteps)
    sigmas = np.append(loglinear_interp(published[:-1], num_inference_steps), 0.0)
    if published_t is None:
        return AysSchedule(sigmas, None)
    timesteps = np.round(sigma_to_t(sigmas[:-1], _sd_log_sigmas())).astype(np.int64)
    if np.any(np.diff(timesteps) >= 0):
        raise invalid("num_inference_steps", "few enough for distinct integer timesteps (pass the sigmas)",
                      num_inference_steps)
    return AysSchedule(sigmas, timesteps)


def _sd_log_sigmas() -> np.ndarray:
    _, _, alphas_cumprod = alphas_cumprod_from_config(_SD_SCHEDULE)
    return np.log(sigmas_from_alphas_cumprod(alphas_cumprod))
