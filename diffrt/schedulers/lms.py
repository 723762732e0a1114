"""Linear multistep (LMS) sampling in sigma space (k-diffusion's ``sample_lms``; Karras et al. 2022 use the same
ODE) as Diffusers' ``LMSDiscreteScheduler``: each step integrates the Lagrange polynomial through the last
``order`` derivatives dx/dsigma = (x - x0) / sigma over the next sigma interval.

Diffusers integrates each Lagrange basis polynomial with ``scipy.integrate.quad``; the integrand is a polynomial of
degree order - 1, so here it is integrated exactly from its coefficients (no scipy at runtime).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import invalid
from .base import KARRAS_COMPATIBLES, SchedulerOutput, register_config, sigma_space_x0
from .sigma_base import StandardSigmaScheduler

logger = logging.getLogger(__name__)


def lms_coefficients(sigmas: np.ndarray, index: int, order: int) -> list[float]:
    """Weights c_j of x_{i+1} = x_i + sum_j c_j d_{i-j}: the integral from sigma_i to sigma_{i+1} of the Lagrange
    basis polynomial l_j through the nodes sigma_i, sigma_{i-1}, ..., sigma_{i-order+1} (l_j = 1 at sigma_{i-j}).

    Exact in float64 from the polynomial's coefficients, in u = sigma - sigma_i so they stay well conditioned when
    sigma_max is large (157 for linear betas) and the interval small. Plain floats: orders are tiny, and NumPy's
    per-call overhead would cost more than the sampler's array work."""
    origin = float(sigmas[index])
    nodes = [float(sigmas[index - k]) - origin for k in range(order)]
    end = float(sigmas[index + 1]) - origin
    return [_basis_integral(nodes, j, end) for j in range(order)]


def _basis_integral(nodes: list[float], j: int, end: float) -> float:
    """Integral over [0, end] of prod_{k != j} (u - u_k) / (u_j - u_k), expanded in powers of u."""
    coefficients, scale = [1.0], 1.0  # ascending powers
    for k, root in enumerate(nodes):
        if k != j:
            shifted = [0.0] + coefficients  # u * p(u)
            coefficients = [a - root * b for a, b in zip(shifted, coefficients + [0.0])]
            scale *= nodes[j] - root
    return sum(c * end ** (n + 1) / (n + 1) for n, c in enumerate(coefficients)) / scale


class LMSDiscreteScheduler(StandardSigmaScheduler):
    """Linear multistep sampler of order up to ``step(order=...)`` (4 by default), one model call per step; the
    first steps use the lower orders the history allows. Beyond Diffusers: custom ``timesteps=`` / ``sigmas=``."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    @register_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._init_tables()
        self.set_timesteps(num_train_timesteps)  # Diffusers starts from the full training schedule

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.derivatives: list[np.ndarray] = []
        self._warned_unscaled = False

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Diffusers' name for one weight: the integral of basis polynomial ``current_order`` at step ``t``."""
        return lms_coefficients(self.sigmas, t, order)[current_order]

    def step(
        self,
        model_output: np.ndarray,
        timestep: Any,
        sample: np.ndarray,
        order: int = 4,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """x_{i+1} = x_i + sum_j c_j d_{i-j} with the newest ``min(i + 1, order)`` derivatives."""
        if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or order < 1:
            raise invalid("order", "an int >= 1", order)
        sample, i = self._begin_sigma_step(model_output, timestep, sample)
        if not self.is_scale_input_called and not self._warned_unscaled:
            logger.warning("call `scale_model_input` before `step`: the model saw an unscaled sample")
            self._warned_unscaled = True
        sigma = self.sigmas[i]
        pred_original_sample = sigma_space_x0(model_output, sample, sigma, self.config.prediction_type)
        self.derivatives.append((sample - pred_original_sample) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(i + 1, order)
        weights = lms_coefficients(self.sigmas, i, order)
        # summed newest first from 0, then added to the sample: Diffusers' order, so float32 rounding matches
        update = np.zeros((), np.float32)
        for weight, derivative in zip(weights, reversed(self.derivatives)):
            update = update + np.float32(weight) * derivative
        prev_sample = (sample + update).astype(model_output.dtype, copy=False)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
