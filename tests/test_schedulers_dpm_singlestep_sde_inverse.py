"""DPMSolverSinglestepScheduler, DPMSolverSDEScheduler, DDIMInverseScheduler and DPMSolverMultistepInverseScheduler
against Diffusers (the installed version is the oracle).

Deterministic loops run through the shared harness: timesteps equal (within an ulp where derived from sigmas),
sigmas within the harness' float32 tolerances, final samples within 1e-5 of the run's largest magnitude.
DPM++ SDE cannot share Diffusers' noise bits (torchsde's Brownian tree, see ``dpm_sde``), so it is checked in
three parts: the deterministic path exactly (``s_noise=0``, and the same scripted noise sampler injected on both
sides), our Brownian path against Brownian-motion covariances, and final-sample moments over many seeds against
the analytic value and against Diffusers + torchsde (``torchsde`` is a test-only dependency; that test skips
without it, as do the SDE parity tests, since Diffusers' module imports it).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from scheduler_harness import Case, assert_parity, learned_range_model, run_diffusers, run_ours, tanh_model

from diffrt.rng import Generator
from diffrt.schedulers import DDIMScheduler, get_scheduler_class
from diffrt.schedulers.brownian import BrownianPath, BrownianTreeNoiseSampler
from diffrt.schedulers.dpm_sde import DPMSolverSDEScheduler
from diffrt.schedulers.dpm_singlestep import DPMSolverSinglestepScheduler, singlestep_orders
from diffrt.schedulers.inverse import DDIMInverseScheduler, DPMSolverMultistepInverseScheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}  # Stable Diffusion's betas
SCHEDULES = [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # Diffusers deprecates the eps-form algorithms
    pytest.mark.filterwarnings("ignore:Should have:UserWarning"),  # torchsde, on float32-rounded interval ends
]


def diffusers_scheduler(name: str, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name)(**config)


def close(got: np.ndarray, ref: np.ndarray, scale: float, rtol: float = 1e-5) -> bool:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64)))) <= rtol * max(1.0, scale)


# ============================================================================================ DPM-Solver singlestep
SS = "DPMSolverSinglestepScheduler"


def ss_case(config: dict, steps: int | dict = 10, **kwargs) -> Case:
    """A singlestep case: the eps form gets a sigma_min final sigma (its update is undefined at 0), SDE a seed."""
    algorithm = config.get("algorithm_type", "dpmsolver++")
    if algorithm == "dpmsolver":
        config = {"final_sigmas_type": "sigma_min", **config}
    set_timesteps = steps if isinstance(steps, dict) else {"num_inference_steps": steps}
    return Case(SS, config, set_timesteps, seed=7 if algorithm.startswith("sde") else None, **kwargs)


def check_ss(case: Case, **kwargs):
    return assert_parity(case, ours=DPMSolverSinglestepScheduler, **kwargs)


SS_SOLVERS = [(a, o, s) for a in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver") for o in (1, 2, 3)
              for s in (("midpoint",) if o == 1 else ("midpoint", "heun"))]


@pytest.mark.parametrize("steps", [1, 5, 12])
@pytest.mark.parametrize("algorithm_type, solver_order, solver_type", SS_SOLVERS)
def test_singlestep_every_algorithm_order_and_solver_type_matches_diffusers(algorithm_type, solver_order,
                                                                            solver_type, steps):
    check_ss(ss_case({**SD, "algorithm_type": algorithm_type, "solver_order": solver_order,
                      "solver_type": solver_type}, steps))


@pytest.mark.parametrize("steps", [6, 12])
@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
def test_singlestep_full_order_final_group_matches_diffusers(algorithm_type, solver_order, steps):
    """lower_order_final=False only takes effect with a sigma_min final sigma and groups that tile the steps: the
    last group then jumps to sigma_min at full order. At third order its D2 = 2 (D1_1 - D1_0) / (r0 - r1) over a
    long last step (r ~ 0.1) lifts float32 rounding ~5x, hence 5e-5 there."""
    rtol = 5e-5 if solver_order == 3 else 1e-5
    check_ss(ss_case({**SD, "algorithm_type": algorithm_type, "solver_order": solver_order, "solver_type": "heun",
                      "lower_order_final": False, "final_sigmas_type": "sigma_min"}, steps), rtol=rtol)


SS_SCHEDULES = [pytest.param({**s, "algorithm_type": a}, id=f"{next(iter(s))}-{a}") for s in SCHEDULES
                for a in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")]
SS_SCHEDULES.append(pytest.param({"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
                                 id="flow"))


@pytest.mark.parametrize("steps", [7, 20])
@pytest.mark.parametrize("config", SS_SCHEDULES)
def test_singlestep_sigma_schedules_match_diffusers(config, steps):
    check_ss(ss_case({**SD, **config, "solver_order": 3, "solver_type": "heun"}, steps))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_singlestep_prediction_types_match_diffusers(prediction_type, algorithm_type):
    check_ss(ss_case({**SD, "prediction_type": prediction_type, "algorithm_type": algorithm_type,
                      "solver_order": 3}, 10))


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
], ids=["linear", "cosine-clipped", "trained_betas"])
def test_singlestep_beta_schedules_and_lambda_clip_match_diffusers(config):
    check_ss(ss_case({**config, "solver_order": 3}, 15))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_singlestep_thresholding_matches_diffusers_and_changes_the_result(algorithm_type):
    config = {"algorithm_type": algorithm_type, "thresholding": True, "sample_max_value": 1.5, "solver_order": 3}
    _, thresholded = check_ss(ss_case(config, 8))
    plain = run_ours(ss_case({**config, "thresholding": False}, 8), DPMSolverSinglestepScheduler)
    assert np.max(np.abs(plain.sample - thresholded.sample)) > 1e-3


def test_singlestep_eps_form_thresholding_runs_where_diffusers_fails():
    """Deviation: Diffusers' dpmsolver thresholding indexes its alpha table with ``None`` and fails; ours thresholds
    x0 at the step's own noise level (as the multistep solver does) and stays finite and bounded."""
    case = ss_case({"algorithm_type": "dpmsolver", "thresholding": True, "sample_max_value": 1.5}, 8)
    with pytest.raises(Exception):
        run_diffusers(case)
    got = run_ours(case, DPMSolverSinglestepScheduler)
    plain = run_ours(ss_case({"algorithm_type": "dpmsolver"}, 8), DPMSolverSinglestepScheduler)
    assert np.isfinite(got.sample).all() and np.max(np.abs(got.sample - plain.sample)) > 1e-3


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("timesteps", [[999, 850, 700, 500, 300, 150, 60, 20], [500]], ids=["8", "1"])
def test_singlestep_custom_timesteps_match_diffusers(timesteps, algorithm_type):
    check_ss(ss_case({**SD, "algorithm_type": algorithm_type, "solver_order": 3}, {"timesteps": timesteps}))


@pytest.mark.parametrize("reference", [{"use_karras_sigmas": True}, {}], ids=["karras", "default"])
def test_singlestep_custom_sigmas_reproduce_the_diffusers_schedule_they_came_from(reference):
    ref = run_diffusers(ss_case({**SD, **reference, "solver_order": 3}, 12))
    got = run_ours(ss_case({**SD, "solver_order": 3}, {"sigmas": ref.sigmas}), DPMSolverSinglestepScheduler)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps)
    assert close(got.sample, ref.sample, ref.scale)


@pytest.mark.parametrize("begin_index", [3, 4, 5])  # order 3: starts at a group's first, second and third call
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_singlestep_img2img_starting_inside_a_group_matches_diffusers(algorithm_type, begin_index):
    check_ss(ss_case({**SD, "algorithm_type": algorithm_type, "solver_order": 3}, 12, begin_index=begin_index))


def test_singlestep_learned_variance_and_dynamic_flow_shift_match_diffusers():
    check_ss(ss_case({"variance_type": "learned_range"}, 10, model=learned_range_model, shape=(1, 3, 8, 8)))
    check_ss(ss_case({"use_flow_sigmas": True, "use_dynamic_shifting": True, "prediction_type": "flow_prediction"},
                     {"num_inference_steps": 12, "mu": 0.8}))


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("solver_order", [1, 2, 3])
def test_singlestep_order_list_equals_diffusers(solver_order, lower_order_final, final_sigmas_type):
    for steps in range(1, 14):
        config = {"solver_order": solver_order, "lower_order_final": lower_order_final,
                  "final_sigmas_type": final_sigmas_type}
        ref = diffusers_scheduler(SS, **config)
        ref.set_timesteps(steps)
        ours = DPMSolverSinglestepScheduler(**config)
        ours.set_timesteps(steps)
        assert list(ours.order_list) == ref.order_list, (config, steps)
    assert singlestep_orders(7, 3, True, True) == (1, 2, 3, 1, 2, 3, 1)


def test_singlestep_lower_order_final_is_decided_per_schedule_not_written_to_the_config():
    """Deviation: Diffusers sets lower_order_final=True in its config for good after one uneven step count; a
    later even schedule on the same instance then differs from a fresh one. Ours behaves like a fresh one."""
    config = {"solver_order": 2, "lower_order_final": False, "final_sigmas_type": "sigma_min"}
    scheduler = DPMSolverSinglestepScheduler(**config)
    scheduler.set_timesteps(5)
    assert scheduler.order_list[-1] == 1 and scheduler.config.lower_order_final is False
    scheduler.set_timesteps(6)
    fresh = diffusers_scheduler(SS, **config)
    fresh.set_timesteps(6)
    assert list(scheduler.order_list) == fresh.order_list == [1, 2, 1, 2, 1, 2]


def test_singlestep_add_noise_clone_and_config_round_trip(tmp_path):
    ours, ref = DPMSolverSinglestepScheduler(**SD), diffusers_scheduler(SS, **SD)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((3, 4, 8, 8), dtype=np.float32), rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    picked = ours.timesteps[[0, 4, 9]]
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(picked)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, picked), expected, rtol=1e-6, atol=1e-6)
    a, b = ours.clone(), ours.clone()
    xa = xb = x0[:1]
    for t in ours.timesteps:  # interleaved runs on clones must not see each other's groups
        xa = a.step(np.tanh(xa), t, xa).prev_sample
        xb = b.step(np.tanh(xb), t, xb).prev_sample
    np.testing.assert_array_equal(xa, xb)
    assert a.clone().model_outputs == [None, None] and a.clone().sigmas is ours.sigmas
    ours.save_config(tmp_path)
    loaded = diffusers.DPMSolverSinglestepScheduler.from_config(diffusers.DPMSolverSinglestepScheduler.load_config(
        tmp_path))
    assert all(loaded.config[k] == v for k, v in ours.config.items() if not k.startswith("_"))


# ============================================================================================ DPM-Solver++ SDE
SDE = "DPMSolverSDEScheduler"
try:
    import torchsde  # noqa: F401

    HAS_TORCHSDE = True
except ImportError:
    HAS_TORCHSDE = False
needs_torchsde = pytest.mark.skipif(not HAS_TORCHSDE, reason="Diffusers' DPMSolverSDEScheduler needs torchsde")


def sde_case(config: dict, steps: int | dict = 8, **kwargs) -> Case:
    set_timesteps = steps if isinstance(steps, dict) else {"num_inference_steps": steps}
    return Case(SDE, {**SD, **config}, set_timesteps, step_kwargs={"s_noise": 0.0}, **kwargs)


def check_sde(case: Case, **kwargs):
    """Midpoint timesteps always come from sigma -> t, so timesteps are compared within an ulp."""
    return assert_parity(case, ours=DPMSolverSDEScheduler, timestep_rtol=1e-6, **kwargs)


@needs_torchsde
@pytest.mark.parametrize("config, steps", [
    ({}, 1), ({}, 7), ({"use_karras_sigmas": True}, 10), ({"use_exponential_sigmas": True}, 6),
    ({"use_beta_sigmas": True, "prediction_type": "v_prediction"}, 6),
    ({"timestep_spacing": "leading", "steps_offset": 1}, 6), ({"timestep_spacing": "trailing"}, 6),
    ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 5),
], ids=str)
def test_sde_schedule_and_noise_free_steps_match_diffusers(config, steps):
    check_sde(sde_case(config, steps))


@needs_torchsde
def test_sde_img2img_begin_index_matches_diffusers():
    check_sde(sde_case({"use_karras_sigmas": True}, 8, begin_index=3))


class ScriptedNoise:
    """A noise sampler giving the same pseudo-random arrays, call by call, on both sides; records its calls."""

    def __init__(self, shape: tuple, wrap=np.asarray) -> None:
        self.rng, self.shape, self.wrap, self.calls = np.random.default_rng(11), shape, wrap, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.wrap(self.rng.standard_normal(self.shape, dtype=np.float32))


def sde_run(scheduler, latent: np.ndarray, steps: int, model, noise_sampler=None, framework=np, **step_kwargs):
    """A pipeline-style loop on either side; ``model`` maps NumPy to NumPy."""
    scheduler.set_timesteps(steps)
    if noise_sampler is not None:
        scheduler.noise_sampler = noise_sampler
    wrap = torch.from_numpy if framework is torch else np.asarray
    x = wrap(latent.copy()) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(wrap(model(np.asarray(model_input))), t, x, **step_kwargs).prev_sample
    return np.asarray(x)


@needs_torchsde
@pytest.mark.parametrize("config, s_noise", [({"use_karras_sigmas": True}, 1.0), ({}, 0.7),
                                             ({"prediction_type": "v_prediction"}, 1.0)], ids=str)
def test_sde_noise_path_matches_diffusers_with_the_same_injected_noise(config, s_noise):
    shape = (1, 4, 8, 8)
    latent = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    def model(x):
        return tanh_model(x, 500.0)

    ours_noise, ref_noise = ScriptedNoise(shape), ScriptedNoise(shape, torch.from_numpy)
    got = sde_run(DPMSolverSDEScheduler(**SD, **config), latent, 8, model, ours_noise, s_noise=s_noise)
    ref = sde_run(diffusers_scheduler(SDE, **SD, **config), latent, 8, model, ref_noise, torch, s_noise=s_noise)
    np.testing.assert_allclose(ours_noise.calls, ref_noise.calls, rtol=1e-6)
    assert len(ours_noise.calls) == 14  # two noisy calls per interval but the last (Euler to sigma 0)
    assert close(got, ref, float(np.max(np.abs(ref))))


def test_brownian_path_increments_have_brownian_covariances():
    """Var(W(b) - W(a)) = |b - a|; increments over disjoint intervals are independent, over overlapping ones they
    covary by the overlap, whatever order the points are queried in (here: ends, middle, then inside)."""
    n = 200_000
    path = BrownianPath((n,), 0.0, 2.0, Generator().manual_seed(3))
    w = {t: path.increment(0.0, t).astype(np.float64) for t in (1.5, 0.5, 1.0, 0.25, 3.0)}
    pairs = {  # (interval 1, interval 2): expected covariance
        ((0.5, 1.5), (0.5, 1.5)): 1.0, ((0.0, 0.5), (1.0, 1.5)): 0.0, ((0.0, 1.0), (0.5, 1.5)): 0.5,
        ((0.25, 1.0), (0.0, 0.5)): 0.25, ((2.0, 3.0), (2.0, 3.0)): 1.0, ((0.0, 2.0), (2.0, 3.0)): 0.0,
    }
    w[0.0], w[2.0] = np.zeros(n), path.increment(0.0, 2.0).astype(np.float64)
    for ((a1, b1), (a2, b2)), expected in pairs.items():
        covariance = float(np.mean((w[b1] - w[a1]) * (w[b2] - w[a2])))
        assert abs(covariance - expected) < 5 * np.sqrt(2.0 / n), (a1, b1, a2, b2, covariance)
    np.testing.assert_array_equal(path.increment(0.5, 1.5), path.increment(0.5, 1.5))  # stored, not redrawn
    np.testing.assert_array_equal(path.increment(1.5, 0.5), -path.increment(0.5, 1.5))


def test_brownian_noise_sampler_is_seeded_normalised_and_per_row_with_generator_lists():
    def make(seed):
        return BrownianTreeNoiseSampler((1, 64), 0.1, 10.0, Generator().manual_seed(seed))

    a, b, c = make(5), make(5), make(6)
    np.testing.assert_array_equal(a(10.0, 3.0), b(10.0, 3.0))
    assert not np.array_equal(a(3.0, 1.0), c(3.0, 1.0))
    rows = BrownianTreeNoiseSampler((2, 64), 0.1, 10.0, [Generator().manual_seed(5), Generator().manual_seed(6)])
    singles = [make(5), make(6)]
    for interval in [(10.0, 3.0), (3.0, 1.0), (10.0, 1.0)]:
        batch = rows(*interval)
        for row, single in enumerate(singles):
            np.testing.assert_array_equal(batch[row:row + 1], single(*interval))
    big = BrownianTreeNoiseSampler((100_000,), 0.03, 14.6, Generator().manual_seed(1))
    for sigma, sigma_next in [(14.6, 9.0), (9.0, 0.03), (14.6, 0.5)]:
        assert abs(float(np.var(big(sigma, sigma_next))) - 1.0) < 0.03


def linear_model(x: np.ndarray) -> np.ndarray:
    """An affine stand-in denoiser: the whole SDE run is then affine in the initial latent and in the noise."""
    return np.float32(0.5) * x + np.float32(0.1)


def noise_response(scheduler, steps: int, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(B, Sigma): B_j = the final sample's response to a unit noise value at noise call j (deterministic path),
    Sigma_jk = covariance of the normalised Brownian increments of calls j and k (their signed overlap)."""
    zero = np.zeros(shape, np.float32)

    class Unit:
        def __init__(self, j):
            self.j, self.calls = j, []

        def __call__(self, sigma, sigma_next):
            self.calls.append((float(sigma), float(sigma_next)))
            return np.full(shape, float(len(self.calls) - 1 == self.j), np.float32)

    probe = Unit(-1)
    base = sde_run(scheduler.clone(), zero, steps, linear_model, probe)
    responses = [float(np.mean(sde_run(scheduler.clone(), zero, steps, linear_model, Unit(j)) - base))
                 for j in range(len(probe.calls))]
    intervals = np.array(probe.calls)
    lo, hi = np.minimum(intervals[:, 0], intervals[:, 1]), np.maximum(intervals[:, 0], intervals[:, 1])
    overlap = np.clip(np.minimum.outer(hi, hi) - np.maximum.outer(lo, lo), 0, None)
    sign = np.sign(intervals[:, 1] - intervals[:, 0])
    return np.array(responses), np.outer(sign, sign) * overlap / np.sqrt(np.outer(hi - lo, hi - lo))


def sde_noise_residuals(make, seeds: range, shape: tuple, steps: int, framework=np) -> np.ndarray:
    """Final sample minus the same run without noise, pooled over elements and seeds: B . xi, mean 0."""
    latents = np.random.default_rng(0)
    out = []
    for seed in seeds:
        latent = latents.standard_normal(shape, dtype=np.float32)
        noisy_scheduler, noisy_kwargs = make(seed)
        zero = (lambda a, b: np.zeros(shape, np.float32)) if framework is np else (lambda a, b: torch.zeros(shape))
        noisy = sde_run(noisy_scheduler, latent, steps, linear_model, framework=framework, **noisy_kwargs)
        plain = sde_run(make(seed)[0], latent, steps, linear_model, zero, framework=framework)
        out.append((noisy.astype(np.float64) - plain).ravel())
    return np.concatenate(out)


SDE_KARRAS = {**SD, "use_karras_sigmas": True}


def test_sde_final_sample_variance_matches_the_brownian_analytic_value():
    """Analytic oracle: with an affine model the final sample is D(x_T) + sum_j B_j xi_j, where xi_j is the
    normalised noise of call j; its variance over seeds is B^T Sigma B with Sigma the Brownian covariance of the
    calls' sigma intervals. Independent per-call noise would give B^T B instead, far outside the tolerance."""
    shape, steps = (1, 4, 32, 32), 6
    template = DPMSolverSDEScheduler(**SDE_KARRAS)
    b, sigma = noise_response(template, steps, shape)
    expected, independent = float(b @ sigma @ b), float(b @ b)
    r = sde_noise_residuals(lambda seed: (template.clone(), {"generator": Generator().manual_seed(seed)}),
                            range(12), shape, steps)
    se = expected * np.sqrt(2.0 / r.size)  # standard error of a Gaussian sample variance
    assert abs(independent - expected) > 20 * se, "the test must tell correlated from independent noise"
    assert abs(float(r.mean())) < 5 * np.sqrt(expected / r.size)
    assert abs(float(r.var()) - expected) < 5 * se, (float(r.var()), expected)


@pytest.mark.slow
@needs_torchsde
def test_sde_final_sample_moments_match_diffusers_with_torchsde():
    """Same statistic from Diffusers (torchsde's Brownian tree, seeded through noise_sampler_seed) and from ours;
    both must match the analytic variance and each other within 5 standard errors (about 1% here)."""
    shape, steps = (1, 4, 32, 32), 6
    b, sigma = noise_response(DPMSolverSDEScheduler(**SDE_KARRAS), steps, shape)
    expected = float(b @ sigma @ b)
    ref = sde_noise_residuals(lambda seed: (diffusers_scheduler(SDE, **SDE_KARRAS, noise_sampler_seed=seed), {}),
                              range(12), shape, steps, framework=torch)
    got = sde_noise_residuals(lambda seed: (DPMSolverSDEScheduler(**SDE_KARRAS, noise_sampler_seed=seed), {}),
                              range(12), shape, steps)
    se = expected * np.sqrt(2.0 / ref.size)
    for r in (ref, got):
        assert abs(float(r.mean())) < 5 * np.sqrt(expected / r.size)
        assert abs(float(r.var()) - expected) < 5 * se
    assert abs(float(ref.var()) - float(got.var())) < 5 * np.sqrt(2) * se


def test_sde_seed_precedence_and_reproducibility():
    """noise_sampler_seed (Diffusers' knob) wins over a step generator; without it the generator decides."""
    latent = np.random.default_rng(2).standard_normal((1, 4, 8, 8), dtype=np.float32)

    def run(scheduler, seed):
        return sde_run(scheduler, latent, 5, lambda x: tanh_model(x, 300.0), generator=Generator().manual_seed(seed))

    np.testing.assert_array_equal(run(DPMSolverSDEScheduler(**SD), 1), run(DPMSolverSDEScheduler(**SD), 1))
    assert not np.array_equal(run(DPMSolverSDEScheduler(**SD), 1), run(DPMSolverSDEScheduler(**SD), 2))
    seeded = DPMSolverSDEScheduler(**SD, noise_sampler_seed=9)
    np.testing.assert_array_equal(run(seeded.clone(), 1), run(seeded.clone(), 2))


@needs_torchsde
def test_sde_custom_sigmas_reproduce_diffusers_karras_and_a_positive_final_sigma_adds_a_call():
    ref = run_diffusers(sde_case({"use_karras_sigmas": True}, 9))
    sigmas = np.append(ref.sigmas[0::2], 0.0)  # one entry per interval start, then the final 0
    got = run_ours(sde_case({}, {"sigmas": sigmas}), DPMSolverSDEScheduler)
    np.testing.assert_allclose(got.timesteps, ref.timesteps, rtol=1e-6)
    assert close(got.sample, ref.sample, ref.scale)
    scheduler = DPMSolverSDEScheduler(**SD)
    scheduler.set_timesteps(sigmas=[10.0, 3.0, 1.0, 0.5])
    assert len(scheduler.timesteps) == 6 and scheduler.sigmas[-1] == np.float32(0.5)


def test_sde_sample_prediction_returns_the_model_output_as_x0():
    scheduler = DPMSolverSDEScheduler(prediction_type="sample")
    scheduler.set_timesteps(4)
    x = np.ones((1, 4, 2, 2), np.float32)
    out = scheduler.step(x * np.float32(0.3), scheduler.timesteps[0], x, generator=Generator().manual_seed(0))
    np.testing.assert_array_equal(out.pred_original_sample, x * np.float32(0.3))


# ================================================================================================= inversion
DDIM_INV, DPM_INV = "DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("extra", [{}, {"set_alpha_to_one": False, "clip_sample": False, "steps_offset": 1},
                                   {"rescale_betas_zero_snr": True, "clip_sample": False}], ids=["default", "alt",
                                                                                                 "zero_snr"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inverse_matches_diffusers(prediction_type, spacing, extra, steps):
    config = {**SD, "prediction_type": prediction_type, "timestep_spacing": spacing, **extra}
    assert_parity(Case(DDIM_INV, config, {"num_inference_steps": steps}), ours=DDIMInverseScheduler)


def test_ddim_inverse_custom_schedules_follow_the_list():
    """Custom timesteps step from the previous entry: on Diffusers' own leading schedule that is its t - T // n
    rule, so the runs agree; custom sigmas are a forward DDIM sigma list reversed, timesteps reversed too."""
    ref = run_diffusers(Case(DDIM_INV, SD, {"num_inference_steps": 10}))
    got = run_ours(Case(DDIM_INV, SD, {"timesteps": ref.timesteps.tolist()}), DDIMInverseScheduler)
    assert close(got.sample, ref.sample, ref.scale)
    forward, inverse = DDIMScheduler(**SD), DDIMInverseScheduler(**SD)
    sigmas = [14.0, 6.0, 2.5, 0.9, 0.2, 0.0]
    forward.set_timesteps(sigmas=sigmas)
    inverse.set_timesteps(sigmas=sigmas[::-1])
    assert len(inverse.timesteps) == 5
    np.testing.assert_array_equal(inverse.timesteps, forward.timesteps[::-1])


def test_ddim_inversion_then_sampling_returns_to_the_start_with_a_constant_noise_model():
    """DDIM is a bijection for a fixed eps: inverting a latent and sampling it back with DDIM gives the latent."""
    eps = np.random.default_rng(4).standard_normal((1, 4, 8, 8), dtype=np.float32)
    start = np.random.default_rng(5).standard_normal((1, 4, 8, 8), dtype=np.float32)
    inverse, forward = DDIMInverseScheduler(**SD, clip_sample=False), DDIMScheduler(**SD, clip_sample=False)
    inverse.set_timesteps(20)
    forward.set_timesteps(20)
    x = start
    for t in inverse.timesteps:
        x = inverse.step(eps, t, x).prev_sample
    assert np.max(np.abs(x - start)) > 1.0
    for t in forward.timesteps:
        x = forward.step(eps, t, x).prev_sample
    np.testing.assert_allclose(x, start, atol=2e-4)


def dpm_inv_case(config: dict, steps: int | dict = 10, **kwargs) -> Case:
    set_timesteps = steps if isinstance(steps, dict) else {"num_inference_steps": steps}
    return Case(DPM_INV, config, set_timesteps, **kwargs)


def check_inv(case: Case, **kwargs):
    return assert_parity(case, ours=DPMSolverMultistepInverseScheduler, **kwargs)


INV_SOLVERS = [(a, o, s) for a in ("dpmsolver++", "dpmsolver") for o in (1, 2, 3)
               for s in (("midpoint",) if o == 1 else ("midpoint", "heun"))]


@pytest.mark.parametrize("steps", [1, 5, 16])
@pytest.mark.parametrize("algorithm_type, solver_order, solver_type", INV_SOLVERS)
def test_dpm_inverse_every_algorithm_order_and_solver_type_matches_diffusers(algorithm_type, solver_order,
                                                                             solver_type, steps):
    check_inv(dpm_inv_case({**SD, "algorithm_type": algorithm_type, "solver_order": solver_order,
                            "solver_type": solver_type}, steps))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dpm_inverse_spacing_and_prediction_types_match_diffusers(prediction_type, spacing):
    check_inv(dpm_inv_case({**SD, "prediction_type": prediction_type, "timestep_spacing": spacing,
                            "steps_offset": 1, "solver_order": 3}, 12))


# 20 exponential sigmas make Diffusers fail: see test_dpm_inverse_repeated_first_timestep_starts_at_the_first_one
INV_SCHEDULES = [pytest.param(s, n, id=f"{next(iter(s))}-{n}") for s in SCHEDULES for n in (8, 20)
                 if not ("use_exponential_sigmas" in s and n == 20)]


@pytest.mark.parametrize("schedule, steps", INV_SCHEDULES)
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_dpm_inverse_sigma_schedules_match_diffusers(algorithm_type, schedule, steps):
    # from 15 steps on, the repeated last sigma is stepped at second order: heun's weight is 0 / 0 in Diffusers
    solver_type = "heun" if steps < 15 else "midpoint"
    check_inv(dpm_inv_case({**SD, **schedule, "algorithm_type": algorithm_type, "solver_type": solver_type}, steps))


def test_dpm_inverse_repeated_first_timestep_starts_at_the_first_one():
    """Deviation: 20 exponential sigmas truncate to timesteps 0, 0, 1, ...; Diffusers starts at the second 0 and
    runs off the end. The oracle is Diffusers with its step index started at 0 by hand."""
    case = dpm_inv_case({**SD, "use_exponential_sigmas": True}, 20)
    with pytest.raises(IndexError):
        run_diffusers(case)
    ref = diffusers_scheduler(DPM_INV, **SD, use_exponential_sigmas=True)
    ref.set_timesteps(20)
    ref._step_index = 0
    x = torch.from_numpy(np.random.default_rng(1234).standard_normal((1, 4, 8, 8), dtype=np.float32))
    for t in ref.timesteps:
        x = ref.step(torch.from_numpy(tanh_model(x.numpy(), float(t))), t, x).prev_sample
    got = run_ours(case, DPMSolverMultistepInverseScheduler)
    assert got.timesteps[0] == got.timesteps[1] == 0
    assert close(got.sample, x.numpy(), float(np.max(np.abs(x.numpy()))))


@pytest.mark.parametrize("order, solver_type", [(2, "heun"), (3, "midpoint")])
def test_dpm_inverse_zero_length_last_step_stays_finite_where_diffusers_gives_nan(order, solver_type):
    """Trailing spacing with >= 15 steps ends on the noisiest timestep, whose sigma is also the final one: Diffusers'
    heun / third-order weights are 0 / 0 there. We take it at first order, as Diffusers with euler_at_final."""
    config = {**SD, "timestep_spacing": "trailing", "solver_order": order, "solver_type": solver_type}
    assert not np.isfinite(run_diffusers(dpm_inv_case(config, 16)).sample).all(), "Diffusers fixed this"
    ref = run_diffusers(dpm_inv_case({**config, "euler_at_final": True}, 16))
    got = run_ours(dpm_inv_case(config, 16), DPMSolverMultistepInverseScheduler)
    assert close(got.sample, ref.sample, ref.scale)
    np.testing.assert_array_equal(got.trace[-1], got.trace[-2])


@pytest.mark.parametrize("config", [
    {"beta_schedule": "linear", "solver_order": 3},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"thresholding": True, "sample_max_value": 1.5},
    {"thresholding": True, "sample_max_value": 1.5, "algorithm_type": "dpmsolver"},
], ids=["linear", "cosine-clipped", "thresholding", "thresholding-eps"])
def test_dpm_inverse_beta_schedules_clip_and_thresholding_match_diffusers(config):
    check_inv(dpm_inv_case(config, 12))


@pytest.mark.parametrize("reference", [{"use_karras_sigmas": True}, {}], ids=["karras", "default"])
def test_dpm_inverse_custom_sigmas_and_timesteps_reproduce_diffusers(reference):
    ref = run_diffusers(dpm_inv_case({**SD, **reference, "solver_order": 3}, 12))
    got = run_ours(dpm_inv_case({**SD, "solver_order": 3}, {"sigmas": ref.sigmas}), DPMSolverMultistepInverseScheduler)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps)
    assert close(got.sample, ref.sample, ref.scale)
    if not reference:  # integer timesteps with the implied noisiest final sigma
        got = run_ours(dpm_inv_case({**SD, "solver_order": 3}, {"timesteps": ref.timesteps.tolist()}),
                       DPMSolverMultistepInverseScheduler)
        assert close(got.sample, ref.sample, ref.scale)


def test_dpm_inverse_refuses_sde_algorithms_where_diffusers_returns_nan():
    assert not np.isfinite(run_diffusers(dpm_inv_case({"algorithm_type": "sde-dpmsolver++"}, 4, seed=0)).sample).all()
    with pytest.raises(ValueError, match="`algorithm_type` must be"):
        DPMSolverMultistepInverseScheduler(algorithm_type="sde-dpmsolver++")


def test_dpm_inverse_flow_schedule_ascends_where_diffusers_reuses_the_forward_one():
    config = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    ref = diffusers_scheduler(DPM_INV, **config)
    ref.set_timesteps(8)
    assert ref.timesteps[0] > ref.timesteps[-1], "Diffusers' flow inversion ascends now: drop the deviation"
    ours = DPMSolverMultistepInverseScheduler(**config)
    ours.set_timesteps(8)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy()[::-1])
    np.testing.assert_array_equal(ours.sigmas[:-1], ref.sigmas.numpy()[:-1][::-1])


def test_dpm_inverse_add_noise_matches_diffusers():
    ours, ref = DPMSolverMultistepInverseScheduler(**SD), diffusers_scheduler(DPM_INV, **SD)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x0, noise = np.full((2, 4, 2, 2), 0.7, np.float32), np.full((2, 4, 2, 2), -1.3, np.float32)
    picked = ours.timesteps[[1, 7]]
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(picked)).numpy()
    np.testing.assert_allclose(ours.add_noise(x0, noise, picked), expected, rtol=1e-6)


# ============================================================================================ API and bad input
ALL = [DPMSolverSinglestepScheduler, DPMSolverSDEScheduler, DDIMInverseScheduler, DPMSolverMultistepInverseScheduler]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_config_schema_defaults_and_compatibles_equal_diffusers(cls):
    if cls is DPMSolverSDEScheduler and not HAS_TORCHSDE:
        pytest.skip("Diffusers' DPMSolverSDEScheduler needs torchsde")
    ref = diffusers_scheduler(cls.__name__)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert {k for k in cls().config if not k.startswith("_")} == set(public)
    assert all(cls().config[k] == v for k, v in public.items())
    assert {c.__name__ for c in cls().compatibles} <= {c.__name__ for c in ref.compatibles}
    assert get_scheduler_class(cls.__name__) is cls


def test_modules_do_not_import_torch():
    code = ("import sys; import diffrt.schedulers.dpm_singlestep, diffrt.schedulers.dpm_sde, "
            "diffrt.schedulers.inverse; from diffrt.schedulers.dpm_sde import DPMSolverSDEScheduler as S; "
            "import numpy as np; s = S(); s.set_timesteps(3); x = np.ones((1, 2), np.float32); "
            "s.step(x, s.timesteps[0], x); "
            "print([m for m in ('torch', 'transformers', 'diffusers', 'torchsde') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cls, config, name", [
    (DPMSolverSinglestepScheduler, {"solver_order": 4}, "solver_order"),
    (DPMSolverSinglestepScheduler, {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    (DPMSolverSinglestepScheduler, {"solver_type": "euler"}, "solver_type"),
    (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
    (DPMSolverSinglestepScheduler, {"use_karras_sigmas": True, "use_flow_sigmas": True}, "use_flow_sigmas"),
    (DPMSolverSinglestepScheduler, {"prediction_type": "x0"}, "prediction_type"),
    (DPMSolverSDEScheduler, {"prediction_type": "flow_prediction"}, "prediction_type"),
    (DPMSolverSDEScheduler, {"timestep_spacing": "uniform"}, "timestep_spacing"),
    (DPMSolverSDEScheduler, {"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_beta_sigmas"),
    (DDIMInverseScheduler, {"timestep_spacing": "linspace"}, "timestep_spacing"),
    (DDIMInverseScheduler, {"beta_schedule": "cosine"}, "beta_schedule"),
    (DPMSolverMultistepInverseScheduler, {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    (DPMSolverMultistepInverseScheduler, {"solver_order": 0}, "solver_order"),
    (DPMSolverMultistepInverseScheduler, {"variance_type": "fixed"}, "variance_type"),
])
def test_bad_config_raises_value_error_naming_the_parameter(cls, config, name):
    with pytest.raises(ValueError, match=f"`[^`]*{name}[^`]*` must be"):
        cls(**config)


@pytest.mark.parametrize("cls, config, kwargs, name", [
    (DPMSolverSinglestepScheduler, {}, {"timesteps": [10, 500]}, "timesteps"),
    (DPMSolverSinglestepScheduler, {"use_karras_sigmas": True}, {"timesteps": [999, 500]}, "timesteps"),
    (DPMSolverSinglestepScheduler, {}, {"num_inference_steps": 10, "mu": 0.5}, "mu"),
    (DPMSolverSinglestepScheduler, {}, {"sigmas": [1.0, 5.0, 0.0]}, "sigmas"),
    (DPMSolverSDEScheduler, {}, {"num_inference_steps": 0}, "num_inference_steps"),
    (DPMSolverSDEScheduler, {}, {"num_inference_steps": 4, "num_train_timesteps": 500}, "num_train_timesteps"),
    (DPMSolverSDEScheduler, {"use_karras_sigmas": True}, {"timesteps": [999, 500]}, "timesteps"),
    (DDIMInverseScheduler, {}, {"num_inference_steps": 1001}, "num_inference_steps"),
    (DDIMInverseScheduler, {}, {"timesteps": [500, 10]}, "timesteps"),
    (DDIMInverseScheduler, {}, {"timesteps": [10.5, 500]}, "timesteps"),
    (DPMSolverMultistepInverseScheduler, {}, {"timesteps": [0, 1000]}, "timesteps"),
    (DPMSolverMultistepInverseScheduler, {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
     {"timesteps": [0, 998]}, "timesteps"),
    (DPMSolverMultistepInverseScheduler, {}, {"sigmas": [0.0, 1.0, 5.0]}, "sigmas"),
    (DPMSolverMultistepInverseScheduler, {"use_beta_sigmas": True}, {"timesteps": [0, 500]}, "timesteps"),
])
def test_bad_set_timesteps_raises_value_error_naming_the_parameter(cls, config, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        cls(**config).set_timesteps(**kwargs)


def test_step_misuse_raises_clear_errors():
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMInverseScheduler().step(x, 0, x)
    sde = DPMSolverSDEScheduler()
    sde.set_timesteps(3)
    with pytest.raises(ValueError, match="integer index"):
        sde.step(x, 0, x)
    single = DPMSolverSinglestepScheduler()
    single.set_timesteps(2)
    for t in single.timesteps:
        single.step(x, t, x)
    with pytest.raises(ValueError, match="past the end"):
        single.step(x, single.timesteps[-1], x)
    with pytest.raises(ValueError, match="exactly one of"):
        DPMSolverMultistepInverseScheduler().set_timesteps(4, timesteps=[0, 10])
