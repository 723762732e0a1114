"""Trajectory Consistency Distillation sampling (Zheng et al. 2024, "Trajectory Consistency Distillation",
strategic stochastic sampling, Algorithm 4) as Diffusers' ``TCDScheduler``.

Each step predicts x0 and eps at t, moves deterministically (DDIM-like) to the intermediate timestep
s = floor((1 - gamma) * t_prev), then re-noises from s forward to t_prev; ``eta`` (the paper's gamma) sets how
much of each step is stochastic: 0 is deterministic, 1 is LCM-like multistep consistency sampling.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import invalid
from .alpha_base import AlphaScheduler
from .base import SchedulerOutput, alpha_space_x0_eps, draw_noise, freeze, register_config

logger = logging.getLogger(__name__)


@dataclass
class TCDSchedulerOutput(SchedulerOutput):
    """TCD's step output: ``pred_noised_sample`` is the estimate at the intermediate timestep s."""

    pred_noised_sample: np.ndarray | None = None

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_noised_sample)


class TCDScheduler(AlphaScheduler):
    """Multistep TCD. ``set_timesteps`` takes TCD's ``original_inference_steps`` and ``strength`` keywords.
    As in Diffusers, ``clip_sample`` / ``thresholding`` are config keys the step does not apply. Beyond
    Diffusers: custom ``sigmas=``."""

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
        original_inference_steps: int | None = None,
        timesteps: Any = None,
        strength: float = 1.0,
        sigmas: Any = None,
    ) -> None:
        """Pick ``num_inference_steps`` evenly spaced entries of the distillation grid (``original_inference_steps``
        timesteps k - 1, 2k - 1, ... with k = T // original steps, truncated by ``strength``), or use custom
        timesteps / sigmas (``strength`` then drops leading entries). As in Diffusers, passing
        ``original_inference_steps`` here makes the grid every training timestep below T * strength instead."""
        cfg = self.config
        if not (isinstance(strength, (int, float, np.floating)) and 0 < strength <= 1):
            raise invalid("strength", "a number in (0, 1]", strength)
        original = cfg.original_inference_steps if original_inference_steps is None else original_inference_steps
        if (not isinstance(original, (int, np.integer)) or isinstance(original, bool)
                or not 1 <= original <= cfg.num_train_timesteps):
            raise invalid("original_inference_steps", f"an int in [1, {cfg.num_train_timesteps}]", original)
        steps, custom = self._parse_schedule(num_inference_steps, timesteps, sigmas)
        if original_inference_steps is None:
            k = cfg.num_train_timesteps // original
            grid = np.arange(1, int(original * strength) + 1) * k - 1
        else:  # Diffusers' rule for an explicit value: the whole training range
            grid = np.arange(0, int(cfg.num_train_timesteps * strength))
        if custom is not None:
            self._warn_off_grid(custom, grid, original)
            self.num_inference_steps = len(custom)
            kept = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            chosen = custom[max(self.num_inference_steps - kept, 0):]
        else:
            chosen = self._grid_subset(steps, grid, original, strength)
            self.num_inference_steps = steps
        self.custom_timesteps = custom is not None
        self.timesteps = freeze(np.asarray(chosen, dtype=np.int64))
        self._reset_run_state()

    def _grid_subset(self, steps: int, grid: np.ndarray, original: int | np.integer, strength: float) -> np.ndarray:
        if len(grid) // steps < 1 or steps > original:
            raise invalid("num_inference_steps", f"<= min(original_inference_steps = {original}, grid length "
                          f"{len(grid)} at strength {strength})", steps)
        indices = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
        return grid[::-1][indices]

    def _warn_off_grid(self, custom: np.ndarray, grid: np.ndarray, original: int | np.integer) -> None:
        if custom[0] != self.config.num_train_timesteps - 1:
            logger.warning("custom timesteps start at %d, not %d: results may be unexpected", custom[0],
                           self.config.num_train_timesteps - 1)
        off_grid = sorted(set(custom[1:].tolist()) - set(grid.tolist()), reverse=True)
        if off_grid:
            logger.warning("custom timesteps off the distillation grid: %s", off_grid)
        if len(custom) > original:
            logger.warning("%d custom timesteps exceed original_inference_steps = %d", len(custom), original)

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        eta: float = 0.3,
        generator: Any = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple:
        """x0, eps at t; x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps at s = floor((1 - eta) t_prev); then, but on the
        last step, x_prev = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z."""
        if not (isinstance(eta, (int, float, np.floating)) and 0 <= eta <= 1):
            raise invalid("eta", "a number in [0, 1]", eta)
        i = self._start_step(model_output, timestep)
        t = int(np.asarray(timestep).item())
        next_index = i + 1
        prev_t = int(self.timesteps[next_index]) if next_index < len(self.timesteps) else 0  # Diffusers: 0, not -1
        # float32 product, as torch computes (1 - eta) * an int64 tensor
        s = int(np.floor(np.float32(1 - eta) * np.float32(prev_t)))
        alpha_t, alpha_prev, alpha_s = self.alphas_cumprod[t], self._alpha_prev(prev_t), self.alphas_cumprod[s]
        x0, eps = alpha_space_x0_eps(model_output, sample, alpha_t, self.config.prediction_type)
        noised = np.sqrt(alpha_s) * x0
        noised += np.sqrt(np.float32(1) - alpha_s) * eps
        if eta > 0 and next_index != self.num_inference_steps:  # not the last step
            noise = draw_noise(model_output.shape, generator, noised.dtype)
            ratio = alpha_prev / alpha_s
            prev_sample = np.sqrt(ratio) * noised
            prev_sample += np.sqrt(np.float32(1) - ratio) * noise
        else:
            prev_sample = noised
        self._step_index = next_index
        if not return_dict:
            return (prev_sample, noised)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0, pred_noised_sample=noised)
