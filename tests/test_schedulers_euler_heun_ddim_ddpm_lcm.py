"""Full-loop parity of the Euler, Euler Ancestral, Heun, DDIM, DDPM, LCM schedulers with Diffusers.

Every case runs the Diffusers scheduler (torch, CPU float32) and ours side by side through
``scheduler_harness.assert_parity``: timesteps equal (exact, or within ~1 float32 ulp where they are derived from
sigmas, see the harness), final samples within 1e-5 of the run's sample scale. Stochastic cases share the seed.
Our extensions (custom timesteps / sigmas where Diffusers has none) are checked against a Diffusers run that
must give the same schedule.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
from scheduler_harness import Case, assert_parity, learned_range_model, run_diffusers, run_ours

import diffrt.schedulers as schedulers
from diffrt.schedulers import AysSchedules, ays_schedule
from diffrt.schedulers.sigma_base import ancestral_step

CONFIGS = Path(__file__).parent / "data" / "scheduler_configs"
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
BETAS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["linspace", "leading", "trailing"]
SIGMA_KINDS = ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"]
AYS_SD_T, AYS_XL_T = AysSchedules["StableDiffusionTimesteps"], AysSchedules["StableDiffusionXLTimesteps"]
AYS_SD_S, AYS_XL_S = AysSchedules["StableDiffusionSigmas"], AysSchedules["StableDiffusionXLSigmas"]


def steps(n: int) -> dict:
    return {"num_inference_steps": n}


def grid(name: str, seed: int | None = None, **extra: object) -> list[Case]:
    """Beta schedule x prediction type x spacing at 10 steps, and step counts 1 / 4 / 25 per spacing."""
    cases = [Case(name, {"beta_schedule": b, "prediction_type": p, "timestep_spacing": s, "steps_offset": 1,
                         **extra}, steps(10), seed=seed)
             for b, p, s in itertools.product(BETAS, PREDICTIONS, SPACINGS)]
    cases += [Case(name, {**SD, "timestep_spacing": s, "steps_offset": 1, **extra}, steps(n), seed=seed)
              for s, n in itertools.product(SPACINGS, [1, 4, 25])]
    return cases


# ----------------------------------------------------------------------------------------------------- Euler
EULER = grid("EulerDiscreteScheduler") + [
    Case("EulerDiscreteScheduler", {**SD, kind: True, "prediction_type": p}, steps(n))
    for kind, p, n in itertools.product(SIGMA_KINDS, ["epsilon", "v_prediction"], [1, 4, 25])
] + [
    Case("EulerDiscreteScheduler", {**SD, kind: True, "final_sigmas_type": "sigma_min"}, steps(10))
    for kind in SIGMA_KINDS
] + [
    Case("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, steps(8)),
    Case("EulerDiscreteScheduler", {**SD, "interpolation_type": "log_linear"}, steps(10)),
    Case("EulerDiscreteScheduler", {**SD, "final_sigmas_type": "sigma_min"}, steps(10)),
    Case("EulerDiscreteScheduler", {**SD, "timestep_type": "continuous", "prediction_type": "v_prediction"}, steps(10)),
    Case("EulerDiscreteScheduler", {**SD, "timestep_type": "continuous", "prediction_type": "v_prediction",
                                    "use_karras_sigmas": True}, steps(10)),
    Case("EulerDiscreteScheduler", {**SD}, steps(10), step_kwargs={"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 8.0},
         seed=5),
    Case("EulerDiscreteScheduler", {**SD, "prediction_type": "v_prediction"}, steps(10),
         step_kwargs={"s_churn": 0.5, "s_noise": 1.003}, seed=6),
    Case("EulerDiscreteScheduler", {**SD}, {"timesteps": AYS_SD_T}),
    Case("EulerDiscreteScheduler", {**SD}, {"sigmas": AYS_SD_S}),
    Case("EulerDiscreteScheduler", {**SD}, {"sigmas": AYS_XL_S}),
    Case("EulerDiscreteScheduler", {**SD}, {"sigmas": ays_schedule("StableDiffusionXL", 25).sigmas.tolist()}),
    Case("EulerDiscreteScheduler", {**SD, "timestep_spacing": "leading"}, {"timesteps": [999.0, 600.5, 123.25]}),
    Case("EulerDiscreteScheduler", {**SD, "timestep_spacing": "trailing"}, steps(10), begin_index=4),
] + [
    Case("EulerDiscreteScheduler", {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                    "timestep_spacing": s}, steps(n))
    for s, n in itertools.product(SPACINGS, [4, 25])  # 1-step linspace starts at t = 0: degenerate, left out
]

# ------------------------------------------------------------------------------------------- Euler Ancestral
EULER_A = [
    Case("EulerAncestralDiscreteScheduler", {"beta_schedule": b, "prediction_type": p, "timestep_spacing": s,
                                             "steps_offset": 1}, steps(n), seed=n)
    for b, p, s, n in itertools.product(["linear", "scaled_linear"], ["epsilon", "v_prediction"], SPACINGS, [1, 10])
] + [
    Case("EulerAncestralDiscreteScheduler", {**SD, "timestep_spacing": s}, steps(25), seed=3) for s in SPACINGS
] + [
    Case("EulerAncestralDiscreteScheduler", {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                             "timestep_spacing": "trailing"}, steps(8), seed=2),
    Case("EulerAncestralDiscreteScheduler", {**SD}, steps(10), seed=4, begin_index=3),
]

# ------------------------------------------------------------------------------------------------------ Heun
HEUN = [
    Case("HeunDiscreteScheduler", {**SD, "prediction_type": p, "timestep_spacing": s, "steps_offset": 1}, steps(n))
    for p, s, n in itertools.product(PREDICTIONS, SPACINGS, [1, 10])
] + [
    Case("HeunDiscreteScheduler", {"beta_schedule": b}, steps(4)) for b in ["linear", "squaredcos_cap_v2", "exp"]
] + [
    Case("HeunDiscreteScheduler", {**SD, kind: True}, steps(4))
    for kind in ["use_karras_sigmas", "use_exponential_sigmas"]
] + [
    Case("HeunDiscreteScheduler", {**SD, "prediction_type": "v_prediction", "clip_sample": True,
                                   "clip_sample_range": 0.8}, steps(10)),
    Case("HeunDiscreteScheduler", {**SD}, {"timesteps": AYS_SD_T}),
    Case("HeunDiscreteScheduler", {**SD}, steps(25)),
    Case("HeunDiscreteScheduler", {**SD}, steps(10), begin_index=3),
]

# ------------------------------------------------------------------------------------------------------ DDIM
DDIM = grid("DDIMScheduler", clip_sample=False) + [
    Case("DDIMScheduler", {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                           "timestep_spacing": s, "clip_sample": False}, steps(n))
    for s, n in itertools.product(SPACINGS, [4, 25])
] + [
    Case("DDIMScheduler", {**SD, "set_alpha_to_one": False, "clip_sample": False}, steps(10)),
    Case("DDIMScheduler", {**SD, "clip_sample": True, "clip_sample_range": 0.7}, steps(10)),
    Case("DDIMScheduler", {**SD, "thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5,
                           "clip_sample": False}, steps(10)),
    Case("DDIMScheduler", {**SD, "clip_sample": False}, steps(10), step_kwargs={"eta": 1.0}, seed=3),
    Case("DDIMScheduler", {**SD, "clip_sample": True}, steps(10),
         step_kwargs={"eta": 0.5, "use_clipped_model_output": True}, seed=4),
    Case("DDIMScheduler", {**SD, "clip_sample": False}, steps(10), begin_index=4),
]

# ------------------------------------------------------------------------------------------------------ DDPM
DDPM_VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]
DDPM = [
    Case("DDPMScheduler", {**SD, "variance_type": v, "prediction_type": p, "clip_sample": False}, steps(10), seed=1,
         model=learned_range_model if v == "learned_range" else Case.model)
    for v, p in itertools.product(DDPM_VARIANCES, PREDICTIONS)
] + [
    Case("DDPMScheduler", {"beta_schedule": b, "timestep_spacing": s, "steps_offset": 1}, steps(n), seed=n)
    for b, s, n in itertools.product(["linear", "squaredcos_cap_v2", "laplace", "sigmoid"], SPACINGS, [1, 25])
] + [
    Case("DDPMScheduler", {**SD, "clip_sample": False}, {"timesteps": AYS_XL_T}, seed=2),
    Case("DDPMScheduler", {**SD, "thresholding": True, "clip_sample": False}, steps(10), seed=2),
    Case("DDPMScheduler", {**SD, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                           "timestep_spacing": "trailing"}, steps(10), seed=2),
    Case("DDPMScheduler", {**SD}, steps(10), seed=2, begin_index=5),
]

# ------------------------------------------------------------------------------------------------------- LCM
LCM = [
    Case("LCMScheduler", {"prediction_type": p}, steps(n), seed=n)
    for p, n in itertools.product(PREDICTIONS, [1, 2, 4, 8])
] + [
    Case("LCMScheduler", {"original_inference_steps": 100, "beta_schedule": "linear"}, steps(6), seed=1),
    Case("LCMScheduler", {"set_alpha_to_one": False, "timestep_scaling": 5.0}, steps(4), seed=1),
    Case("LCMScheduler", {"clip_sample": True}, steps(4), seed=1),
    Case("LCMScheduler", {"thresholding": True}, steps(4), seed=1),
    Case("LCMScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, steps(4), seed=1),
    Case("LCMScheduler", {}, {"timesteps": [999, 759, 499, 259]}, seed=1),
    Case("LCMScheduler", {}, {"num_inference_steps": 4, "original_inference_steps": 30}, seed=1),
    Case("LCMScheduler", {}, {"num_inference_steps": 4, "strength": 0.5}, seed=1),
    Case("LCMScheduler", {}, steps(6), seed=3, begin_index=2),
]


@pytest.mark.parametrize("case", EULER + EULER_A + HEUN + DDIM + DDPM + LCM, ids=str)
def test_loop_matches_diffusers(case: Case) -> None:
    assert_parity(case)


@pytest.mark.slow
def test_heun_beta_sigmas_match_diffusers() -> None:
    """Separate and slow: Diffusers' Heun builds a 1000-step beta-sigma schedule at construction (scipy ppf)."""
    assert_parity(Case("HeunDiscreteScheduler", {**SD, "use_beta_sigmas": True}, steps(4)))


# ----------------------------------------------------------------------- real published scheduler configs
STATISTICAL_ONLY = {"DPMSolverSDEScheduler"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_published_config_drives_every_compatible_class_like_diffusers(path: Path) -> None:
    config = json.loads(path.read_text())
    source = config["_class_name"]
    names = [n for n in schedulers.registered_names()
             if n == source or source in schedulers.get_scheduler_class(n)._compatibles]
    assert names, f"no diffrt class accepts {source}"
    for name in names:
        s = schedulers.get_scheduler_class(name).from_config(path)
        assert s.config["_class_name"] == name and s.config.beta_schedule == "scaled_linear"
        if name in STATISTICAL_ONLY:
            continue  # its noise cannot equal torchsde's Brownian tree draw for draw; see its own tests
        n = 4 if name == "LCMScheduler" else 10
        assert_parity(Case(name, {}, steps(n), seed=11), config=config)


def test_published_configs_load_by_class_name() -> None:
    sdxl = schedulers.from_config(CONFIGS / "stable-diffusion-xl-base-1.0.json")
    assert type(sdxl).__name__ == "EulerDiscreteScheduler" and sdxl.config.timestep_spacing == "leading"
    sd21 = schedulers.from_config(CONFIGS / "stable-diffusion-2-1.json")
    assert type(sd21).__name__ == "DDIMScheduler" and sd21.config.prediction_type == "v_prediction"
    assert type(schedulers.from_config(CONFIGS / "LCM_Dreamshaper_v7.json")).__name__ == "LCMScheduler"


# ------------------------------------------------------------- our extensions, checked through equal schedules
def _same_final(ours_case: Case, ref_case: Case, rtol: float = 1e-5) -> None:
    ref, got = run_diffusers(ref_case), run_ours(ours_case)
    assert len(got.trace) == len(ref.trace)
    err = np.max(np.abs(got.sample.astype(np.float64) - ref.sample))
    assert err <= rtol * max(1.0, ref.scale), f"{err} for {ours_case}"


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_custom_timesteps_equal_to_a_spacing_reproduce_it(name: str, spacing: str) -> None:
    """DDIM has no custom timesteps in Diffusers; with the list a spacing produces, ours must match that run.
    (For leading/trailing, Diffusers' previous step t - T // n is the next listed timestep.)"""
    cfg = {**SD, "timestep_spacing": spacing, "steps_offset": 1, "clip_sample": False}
    ref = getattr(diffusers, name).from_config(cfg)
    ref.set_timesteps(10)
    timesteps = ref.timesteps.tolist()
    _same_final(Case(name, cfg, {"timesteps": timesteps}, seed=1), Case(name, cfg, steps(10), seed=1))


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "LCMScheduler"])
def test_custom_sigmas_map_to_the_timesteps_they_come_from(name: str) -> None:
    cfg = {**SD, "timestep_spacing": "trailing", "clip_sample": False}
    ref = getattr(diffusers, name).from_config(cfg)
    ref.set_timesteps(4)
    table = np.sqrt((1 - ref.alphas_cumprod.numpy()) / ref.alphas_cumprod.numpy())
    sigmas = [*table[ref.timesteps.numpy()].tolist(), 0.0]
    ours = schedulers.get_scheduler_class(name).from_config(cfg)
    ours.set_timesteps(sigmas=sigmas)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    _same_final(Case(name, cfg, {"sigmas": sigmas}, seed=2), Case(name, cfg, steps(4), seed=2))


def test_euler_ancestral_custom_timesteps_and_sigmas_reproduce_its_spacing() -> None:
    ref = diffusers.EulerAncestralDiscreteScheduler(**SD)
    ref.set_timesteps(10)
    base = Case("EulerAncestralDiscreteScheduler", SD, steps(10), seed=9)
    _same_final(base.replace(set_timesteps={"timesteps": ref.timesteps.tolist()}), base)
    _same_final(base.replace(set_timesteps={"sigmas": ref.sigmas.tolist()}), base, rtol=1e-4)  # t within 1e-3


def test_heun_custom_sigmas_reproduce_its_karras_schedule() -> None:
    ref = diffusers.HeunDiscreteScheduler(**SD, use_karras_sigmas=True)
    ref.set_timesteps(6)
    sigmas = ref.sigmas.numpy()
    unique = [sigmas[0], *sigmas[1:-1:2], sigmas[-1]]
    ours = schedulers.HeunDiscreteScheduler(**SD)
    ours.set_timesteps(sigmas=unique)
    np.testing.assert_array_equal(ours.sigmas, sigmas)
    _same_final(Case("HeunDiscreteScheduler", SD, {"sigmas": unique}),
                Case("HeunDiscreteScheduler", {**SD, "use_karras_sigmas": True}, steps(6)))


def test_euler_ancestral_sample_prediction_is_the_epsilon_update_of_the_same_x0() -> None:
    """Diffusers raises for prediction_type="sample" here; ours must equal epsilon prediction whose output
    is the noise that x0 implies: eps = (x - x0) / sigma."""
    def x0_model(x: np.ndarray, t: float) -> np.ndarray:
        return np.float32(0.8) * x

    results = []
    for prediction_type in ("sample", "epsilon"):
        s = schedulers.EulerAncestralDiscreteScheduler(**SD, prediction_type=prediction_type)
        s.set_timesteps(6)
        gen = np.random.default_rng(3)
        x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32) * s.init_noise_sigma
        for t in s.timesteps:
            sigma = s.sigmas[s.step_index or 0]
            x0 = x0_model(x, t)
            out = x0 if prediction_type == "sample" else (x - x0) / sigma
            x = s.step(out, t, x, generator=gen).prev_sample
        results.append(x)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_ddpm_fixed_large_log_is_the_fixed_large_std() -> None:
    """Diffusers' fixed_large_log takes sqrt(log(beta)) (NaN); ours uses the log-variance as such."""
    finals = []
    for variance_type in ("fixed_large", "fixed_large_log"):
        case = Case("DDPMScheduler", {**SD, "variance_type": variance_type}, steps(10), seed=5)
        finals.append(run_ours(case).sample)
    assert np.isfinite(finals[1]).all()
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-5, atol=1e-6)


def test_ddim_eta_with_explicit_variance_noise_equals_the_seeded_draw() -> None:
    from diffrt.rng import Generator, randn

    s = schedulers.DDIMScheduler(**SD, clip_sample=False)
    s.set_timesteps(4)
    x = np.ones((1, 4, 8, 8), np.float32)
    t = s.timesteps[0]
    a = s.clone().step(np.tanh(x), t, x, eta=1.0, generator=Generator().manual_seed(4)).prev_sample
    noise = randn(x.shape, generator=Generator().manual_seed(4))
    b = s.clone().step(np.tanh(x), t, x, eta=1.0, variance_noise=noise).prev_sample
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="`variance_noise`"):
        s.clone().step(np.tanh(x), t, x, eta=1.0, variance_noise=noise, generator=Generator())


# ------------------------------------------------------------------------ the ancestral noise split (sigma_base)
def test_ancestral_step_splits_sigma_to_as_derived_by_hand() -> None:
    """sigma 2 -> 1: sigma_up = sqrt(1 * (4 - 1) / 4) = sqrt(3) / 2, sigma_down = sqrt(1 - 3 / 4) = 1 / 2;
    float32 scalars in, float32 scalars out."""
    down, up = ancestral_step(np.float32(2), np.float32(1))
    assert type(down) is np.float32 and type(up) is np.float32
    np.testing.assert_allclose([down, up], [0.5, np.sqrt(3) / 2], rtol=1e-6)


def test_ancestral_step_eta_scales_the_noise_and_zero_gives_a_deterministic_step() -> None:
    down, up = ancestral_step(np.float32(2), np.float32(1), eta=0.5)
    np.testing.assert_allclose([down, up], [np.sqrt(1 - 3 / 16), np.sqrt(3) / 4], rtol=1e-6)
    assert ancestral_step(np.float32(2), np.float32(1), eta=0.0) == (1, 0)


def test_ancestral_step_caps_sigma_up_only_where_rounding_would_make_sigma_down_nan() -> None:
    """k-diffusion's min(sigma_to, ...): for sigma_to / sigma_from below about 2**-12, float32 rounding can put the
    uncapped sigma_up an ulp above sigma_to, and sigma_down = sqrt(negative). Everywhere else the values are the
    uncapped formula's, bit for bit (the one Euler-Ancestral and KDPM2-Ancestral used before sharing this)."""
    sigma_from = np.full(20000, 80, np.float32)
    sigma_to = np.geomspace(1e-5, 80, 20000).astype(np.float32)
    with np.errstate(invalid="ignore"):
        up = np.sqrt(sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from))
        down = np.sqrt(sigma_to * sigma_to - up * up)
    overshoot = up > sigma_to
    assert overshoot.any() and np.isnan(down[overshoot]).all()  # the case is exercised
    got_down, got_up = ancestral_step(sigma_from, sigma_to)
    np.testing.assert_array_equal(got_up[overshoot], sigma_to[overshoot])
    np.testing.assert_array_equal(got_down[overshoot], 0)
    np.testing.assert_array_equal(got_up[~overshoot], up[~overshoot])
    np.testing.assert_array_equal(got_down[~overshoot], down[~overshoot])
