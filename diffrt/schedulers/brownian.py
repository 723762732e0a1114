"""Brownian motion sampled lazily in NumPy: the noise source of k-diffusion's DPM++ SDE sampler.

A stochastic sampler that evaluates its noise over overlapping intervals (DPM++ SDE asks for W over
[sigma_mid, sigma] and then over [sigma_next, sigma]) needs the increments of *one* Brownian path, not independent
draws: the two increments share the part [sigma_mid, sigma], so they are correlated. ``BrownianPath`` keeps the
values W(t) it has drawn and places every new point by the Brownian bridge between its known neighbours
(the Brownian bridge construction, Glasserman 2004, "Monte Carlo Methods in Financial Engineering", sec. 3.1;
the idea behind Li et al.'s virtual Brownian tree, arXiv:2001.01328, which torchsde implements),
so any set of queries has exactly the joint law of Brownian motion, whatever the order they come in. Draws go
through ``diffrt.rng`` (torch-seed compatible generators, numpy generators, lists of them per batch row).
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Sequence

import numpy as np

from ..errors import invalid
from .base import draw_noise


class BrownianPath:
    """One Brownian path W over the real line with W(t0) = 0, drawn on demand, elementwise over ``shape``.

    ``increment(a, b)`` = W(b) - W(a) ~ N(0, |b - a|). The first draw is W(t1) (so a path seeded the same way
    gives the same values for the same queries); points outside the known range extend the path with independent
    increments, points inside are bridge samples. The values depend on the order of the queries (their joint law
    does not; torchsde's dyadic tree pays ~24 draws per query to avoid that); a sampler queries in a fixed order,
    so a seed reproduces a run. Values are stored in float32, one array per queried point."""

    def __init__(self, shape: Sequence[int], t0: float, t1: float, generator: Any = None) -> None:
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1)):
            raise invalid("t0, t1", "finite times", (t0, t1))
        self.shape = tuple(int(n) for n in shape)
        self.generator = generator
        self._times = [t0]
        self._values = [np.zeros(self.shape, np.float32)]
        self._value_at(t1)  # a no-op when t1 == t0 (a one-step schedule has one positive sigma)

    def _normal(self) -> np.ndarray:
        return draw_noise(self.shape, self.generator, np.float32)

    def _value_at(self, t: float) -> np.ndarray:
        """W(t): the stored value, or a new one drawn given the path so far (only the neighbours matter: Markov)."""
        times = self._times
        k = bisect.bisect_left(times, t)
        if k < len(times) and times[k] == t:
            return self._values[k]
        if k == len(times):  # beyond the right end: an independent increment forward
            value = self._values[-1] + np.float32(math.sqrt(t - times[-1])) * self._normal()
        elif k == 0:  # before the left end: an independent increment backward
            value = self._values[0] - np.float32(math.sqrt(times[0] - t)) * self._normal()
        else:  # Brownian bridge between the neighbours a < t < b
            a, b = times[k - 1], times[k]
            weight, std = (t - a) / (b - a), math.sqrt((t - a) * (b - t) / (b - a))
            w_a, w_b = self._values[k - 1], self._values[k]
            value = w_a + np.float32(weight) * (w_b - w_a) + np.float32(std) * self._normal()
        times.insert(k, t)
        self._values.insert(k, value)
        return value

    def increment(self, a: float, b: float) -> np.ndarray:
        """W(b) - W(a) (negative of W(a) - W(b)), float32, shaped like the path."""
        w_a = self._value_at(float(a))
        return self._value_at(float(b)) - w_a


class BrownianTreeNoiseSampler:
    """k-diffusion's ``BrownianTreeNoiseSampler`` interface: ``sampler(sigma, sigma_next)`` gives the standard
    normal (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) of one Brownian path over sigma, so calls on
    overlapping sigma intervals are correlated exactly as the SDE solver assumes."""

    def __init__(self, shape: Sequence[int], sigma_min: float, sigma_max: float, generator: Any = None) -> None:
        self.path = BrownianPath(shape, sigma_min, sigma_max, generator)

    def __call__(self, sigma: Any, sigma_next: Any) -> np.ndarray:
        sigma, sigma_next = float(sigma), float(sigma_next)
        if sigma == sigma_next:
            raise invalid("sigma_next", "different from sigma (a zero-length interval has no normalised noise)",
                          sigma_next)
        return self.path.increment(sigma, sigma_next) / np.float32(math.sqrt(abs(sigma_next - sigma)))
