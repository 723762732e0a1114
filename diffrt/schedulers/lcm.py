"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3) as
Diffusers' ``LCMScheduler``: each step maps x_t to a consistency-function estimate of x0, then re-noises it to
the next timestep of a schedule taken from the distillation grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import invalid
from .alpha_base import AlphaScheduler
from .base import SchedulerOutput, alpha_space_x0, draw_noise, freeze, register_config

SIGMA_DATA = 0.5  # the consistency-model data std (Song et al. 2023), fixed in LCM's boundary condition


@dataclass
class LCMSchedulerOutput(SchedulerOutput):
    """LCM's step output: ``denoised`` is the boundary-conditioned x0 estimate pipelines decode at the end."""

    denoised: np.ndarray | None = None

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.denoised)


def boundary_scalings(timestep: int, timestep_scaling: float) -> tuple[np.float32, np.float32]:
    """c_skip, c_out of the consistency parameterisation f(x, t) = c_skip x + c_out x0 (LCM eq. 4), in float32."""
    scaled = np.float32(timestep) * np.float32(timestep_scaling)
    sigma2 = np.float32(SIGMA_DATA**2)
    c_skip = sigma2 / (scaled * scaled + sigma2)
    c_out = scaled / np.sqrt(scaled * scaled + sigma2)
    return c_skip, c_out


class LCMScheduler(AlphaScheduler):
    """Multistep LCM. ``set_timesteps`` takes LCM's ``original_inference_steps`` and ``strength`` as keywords.
    Beyond Diffusers: custom ``sigmas=``."""

    _compatibles: tuple[str, ...] = ()
    order = 1

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Any = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._init_tables()
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Any = None,
        timesteps: Any = None,
        sigmas: Any = None,
        *,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
    ) -> None:
        """Pick ``num_inference_steps`` evenly spaced entries of the distillation grid (the
        ``original_inference_steps`` timesteps k - 1, 2k - 1, ... with k = T // original steps, truncated by
        ``strength``), or use custom timesteps / sigmas (img2img ``strength`` then drops leading entries)."""
        cfg = self.config
        original = cfg.original_inference_steps if original_inference_steps is None else original_inference_steps
        if not isinstance(original, (int, np.integer)) or not 1 <= original <= cfg.num_train_timesteps:
            raise invalid("original_inference_steps", f"an int in [1, {cfg.num_train_timesteps}]", original)
        if not 0 < strength <= 1:
            raise invalid("strength", "in (0, 1]", strength)
        steps, custom = self._parse_schedule(num_inference_steps, timesteps, sigmas)
        k = cfg.num_train_timesteps // original
        grid = np.arange(1, int(original * strength) + 1) * k - 1  # the distillation timesteps, ascending
        if custom is not None:
            self.num_inference_steps = len(custom)
            init_timestep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            chosen = custom[max(self.num_inference_steps - init_timestep, 0):]
        else:
            if steps > len(grid) or steps > original:
                raise invalid("num_inference_steps", f"<= original_inference_steps x strength = {len(grid)}",
                              steps)
            self.num_inference_steps = steps
            indices = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
            chosen = grid[::-1][indices]
        self.custom_timesteps = custom is not None
        self.timesteps = freeze(np.asarray(chosen, dtype=np.int64))
        self._reset_run_state()

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        generator: Any = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple:
        """denoised = c_skip x_t + c_out x0; then x_prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) z, except on
        the last step (and so for one-step sampling), which returns ``denoised`` itself."""
        i = self._start_step(model_output, timestep)
        t = int(np.asarray(timestep).item())
        next_index = i + 1
        prev_t = int(self.timesteps[next_index]) if next_index < len(self.timesteps) else t
        alpha_prod_t, alpha_prev = self.alphas_cumprod[t], self._alpha_prev(prev_t)
        c_skip, c_out = boundary_scalings(t, self.config.timestep_scaling)
        x0 = self._process_x0(alpha_space_x0(model_output, sample, alpha_prod_t, self.config.prediction_type))
        denoised = c_out * x0
        denoised += c_skip * sample
        if next_index != self.num_inference_steps:  # not the last step
            noise = draw_noise(model_output.shape, generator, model_output.dtype)
            noise *= np.sqrt(np.float32(1) - alpha_prev)
            prev_sample = np.sqrt(alpha_prev) * denoised
            prev_sample += noise
        else:
            prev_sample = denoised
        self._step_index = next_index
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0, denoised=denoised)
