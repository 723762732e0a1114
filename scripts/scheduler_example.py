"""The seed document's scheduler example, torch-free: SDXL's Euler scheduler driven by the Align-Your-Steps
sigmas, with a stand-in denoiser instead of the UNet. Needs only numpy and diffrt.

    python scripts/scheduler_example.py

It prints the schedule, runs the denoising loop and checks itself: the stand-in is the ideal denoiser of a
single known latent, for which the Euler ODE lands exactly on that latent (x0 + (x - x0) * sigma' / sigma
reaches x0 at sigma' = 0), so the final latent must equal it to float32 rounding.
"""
from __future__ import annotations

import sys

import numpy as np

from diffrt.rng import Generator, randn
from diffrt.schedulers import AysSchedules, EulerDiscreteScheduler, ays_schedule

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (the keys Euler uses)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "leading", "steps_offset": 1, "interpolation_type": "linear", "use_karras_sigmas": False,
}
SEED_DOC_SIGMAS = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0]


def stand_in_unet(latent_in: np.ndarray, sigma: np.float32, target: np.ndarray) -> np.ndarray:
    """Epsilon of the ideal denoiser for data = {target}: the input is x / sqrt(sigma^2 + 1) (Euler's
    ``scale_model_input``), so x = input * sqrt(sigma^2 + 1) and eps = (x - target) / sigma."""
    x = latent_in * np.sqrt(sigma * sigma + np.float32(1))
    return (x - target) / sigma


def main() -> int:
    print("AYS SDXL timesteps:", AysSchedules["StableDiffusionXLTimesteps"])
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    scheduler.set_timesteps(sigmas=SEED_DOC_SIGMAS)
    print("timesteps:", np.round(scheduler.timesteps.astype(float), 2).tolist())
    print("sigmas:   ", np.round(scheduler.sigmas.astype(float), 3).tolist())
    print("AYS SDXL at 15 steps, sigmas:", np.round(ays_schedule("StableDiffusionXL", 15).sigmas, 3).tolist())

    generator = Generator("cpu").manual_seed(123)
    target = np.tanh(randn((1, 4, 128, 128), generator=generator))  # the "image" the stand-in knows
    latents = randn((1, 4, 128, 128), generator=generator) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = stand_in_unet(model_input, scheduler.sigmas[i], target)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
        distance = np.abs(latents - target).max()
        print(f"step {i:2d}  t={t:7.2f}  sigma={scheduler.sigmas[i]:7.3f}  |x - target| max {distance:.2e}")

    error = float(np.abs(latents - target).max())
    ok = error < 1e-4
    print(f"self-check: final latent equals the denoiser's target within {error:.1e}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
