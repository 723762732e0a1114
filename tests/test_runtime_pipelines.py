"""End-to-end parity: our pipeline on our exported package vs the Diffusers pipeline on the original folder.

Same prompt, same seed (`torch.Generator("cpu")` on the Diffusers side, the plain seed on ours), output_type "np".
Tolerance: max abs diff <= 1e-3 on images in [0, 1] (ONNX Runtime vs PyTorch float32 kernels differ by ~1e-6 per
op; through a few UNet steps and the VAE that stays far below 1e-3).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffrt import schedulers as ours  # noqa: E402
from diffrt.runtime import DiffusionPipeline  # noqa: E402

TOL = 1e-3
PROMPT = "a photo of a cat sitting on a red chair"
AYS_SDXL_SIGMAS = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0]

# A1111 name -> (class name, config overrides), as the Diffusers scheduler docs map them
SCHEDULERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
}

_reference_cache: dict = {}


def reference(folder, cls_name=None, overrides=None, **pipe_kwargs):
    """The Diffusers pipeline for `folder`, with the scheduler swapped like a user would."""
    key = str(folder)
    if key not in _reference_cache:
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        _reference_cache[key] = (pipe, pipe.scheduler)
    pipe, original = _reference_cache[key]
    # Always start from the checkpoint's own scheduler: a previous test's swap must not leak its options.
    pipe.scheduler = original
    if cls_name is not None:
        pipe.scheduler = getattr(diffusers, cls_name).from_config(original.config, **(overrides or {}))
    return pipe


def ours_for(package, cls_name=None, overrides=None, pipeline_class=None):
    cls = pipeline_class or DiffusionPipeline
    pipe = cls.from_pretrained(package)
    pipe.set_progress_bar_config(disable=True)
    if cls_name is not None:
        pipe.scheduler = getattr(ours, cls_name).from_config(pipe.scheduler.config, **(overrides or {}))
    return pipe


def run_both(kind, tiny_checkpoint, tiny_package, cls_name=None, overrides=None, seed=0, diffusers_cls=None,
             ours_cls=None, **kwargs):
    folder, package = tiny_checkpoint(kind), tiny_package(kind)
    ref_pipe = reference(folder, cls_name, overrides)
    if diffusers_cls is not None:
        ref_pipe = diffusers_cls.from_pipe(ref_pipe)
        ref_pipe.set_progress_bar_config(disable=True)
    ref_generator = torch.Generator("cpu").manual_seed(seed)
    expected = ref_pipe(generator=ref_generator, output_type="np", **kwargs).images
    pipe = ours_for(package, cls_name, overrides, ours_cls)
    got = pipe(generator=seed, output_type="np", **kwargs).images
    return np.asarray(expected), np.asarray(got)


def assert_close(expected, got, tol=TOL):
    assert expected.shape == got.shape
    diff = float(np.abs(expected - got).max())
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol:.0e}"


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sd15_text_to_image_matches_diffusers_for_each_scheduler(scheduler, tiny_checkpoint, tiny_package):
    cls_name, overrides = SCHEDULERS[scheduler]
    expected, got = run_both("sd15", tiny_checkpoint, tiny_package, cls_name, overrides, prompt=PROMPT,
                             num_inference_steps=4, height=64, width=64)
    assert_close(expected, got)


@pytest.mark.parametrize(
    "options",
    [
        {"guidance_scale": 1.0},
        {"guidance_scale": 7.5, "guidance_rescale": 0.7},
        {"num_images_per_prompt": 2, "negative_prompt": "blurry"},
        {"prompt": [PROMPT, "a dog in the snow"], "negative_prompt": ["ugly", "low quality"]},
        {"timesteps": [999, 845, 730, 587, 443, 310, 193, 116, 53, 13]},
        {"height": 64, "width": 96},
    ],
    ids=lambda o: "-".join(sorted(o)),
)
def test_sd15_call_options_match_diffusers(options, tiny_checkpoint, tiny_package):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "height": 64, "width": 64, **options}
    expected, got = run_both("sd15", tiny_checkpoint, tiny_package, "EulerDiscreteScheduler", {}, **kwargs)
    assert_close(expected, got)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd15_clip_skip_matches_final_layer_norm_of_an_earlier_layer(clip_skip, tiny_checkpoint, tiny_package):
    """Diffusers 0.42 + transformers 5 crash on SD clip_skip (`text_model` is gone), so the oracle feeds Diffusers
    the embeddings its encode_prompt would compute: final_layer_norm(hidden_states[-(clip_skip + 1)])."""
    folder = tiny_checkpoint("sd15")
    ref = reference(folder, "EulerDiscreteScheduler", {})
    ids = ref.tokenizer([PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref.text_encoder(ids.input_ids, output_hidden_states=True)
        embeds = ref.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)][:1])
        negative = out.last_hidden_state[1:]
    kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    expected = ref(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0),
                   **kwargs).images
    pipe = ours_for(tiny_package("sd15"), "EulerDiscreteScheduler", {})
    got = pipe(PROMPT, clip_skip=clip_skip, generator=0, **kwargs).images
    assert_close(expected, got)


def test_sdxl_clip_skip_matches_diffusers(tiny_checkpoint, tiny_package):
    expected, got = run_both("sdxl", tiny_checkpoint, tiny_package, prompt=PROMPT, clip_skip=1,
                             num_inference_steps=3, height=64, width=64)
    assert_close(expected, got)


def test_sd2_v_prediction_matches_diffusers(tiny_checkpoint, tiny_package):
    expected, got = run_both("sd2", tiny_checkpoint, tiny_package, prompt=PROMPT, num_inference_steps=4,
                             height=64, width=64)
    assert_close(expected, got)


@pytest.mark.parametrize("scheduler", ["Euler", "Euler a", "DPM++ 2M Karras"])
def test_sdxl_text_to_image_matches_diffusers(scheduler, tiny_checkpoint, tiny_package):
    cls_name, overrides = SCHEDULERS[scheduler]
    expected, got = run_both("sdxl", tiny_checkpoint, tiny_package, cls_name, overrides, prompt=PROMPT,
                             num_inference_steps=4, height=64, width=64)
    assert_close(expected, got)


def test_sdxl_with_the_ays_sigmas_of_the_diffusers_docs_example(tiny_checkpoint, tiny_package):
    expected, got = run_both("sdxl", tiny_checkpoint, tiny_package, "EulerDiscreteScheduler", {}, seed=123,
                             prompt="anthropomorphic capybara wearing a suit and working with a computer",
                             sigmas=AYS_SDXL_SIGMAS, height=64, width=64)
    assert_close(expected, got)


def test_sdxl_negative_prompt_and_size_conditioning(tiny_checkpoint, tiny_package):
    expected, got = run_both("sdxl", tiny_checkpoint, tiny_package, prompt=PROMPT, prompt_2="a painting",
                             negative_prompt="blurry", num_inference_steps=3, height=64, width=64,
                             original_size=(128, 128), crops_coords_top_left=(8, 0), guidance_rescale=0.5)
    assert_close(expected, got)


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_sd15_img2img_matches_diffusers(strength, tiny_checkpoint, tiny_package):
    from diffrt.runtime import StableDiffusionImg2ImgPipeline

    image = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    expected, got = run_both("sd15", tiny_checkpoint, tiny_package, "EulerAncestralDiscreteScheduler", {},
                             diffusers_cls=diffusers.StableDiffusionImg2ImgPipeline,
                             ours_cls=StableDiffusionImg2ImgPipeline, prompt=PROMPT, image=image,
                             strength=strength, num_inference_steps=10)
    assert_close(expected, got)


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_sdxl_refiner_img2img_matches_diffusers(strength, tiny_checkpoint, tiny_package):
    image = np.random.default_rng(1).random((1, 64, 64, 3)).astype(np.float32)
    expected, got = run_both("sdxl_refiner", tiny_checkpoint, tiny_package, prompt=PROMPT, image=image,
                             strength=strength, num_inference_steps=10)
    assert_close(expected, got)


def test_sd_inpaint_matches_diffusers(tiny_checkpoint, tiny_package):
    rng = np.random.default_rng(2)
    image = rng.random((1, 64, 64, 3)).astype(np.float32)
    mask = np.zeros((1, 64, 64, 1), np.float32)
    mask[:, 16:48, 16:48] = 1.0
    expected, got = run_both("sd_inpaint", tiny_checkpoint, tiny_package, "DDIMScheduler", {}, prompt=PROMPT,
                             image=image, mask_image=mask, num_inference_steps=4, height=64, width=64,
                             strength=0.8)
    assert_close(expected, got)


def test_lcm_matches_diffusers(tiny_checkpoint, tiny_package):
    expected, got = run_both("lcm", tiny_checkpoint, tiny_package, prompt=PROMPT, num_inference_steps=4,
                             height=64, width=64)
    assert_close(expected, got)


def test_generator_list_gives_each_image_its_own_seed(tiny_checkpoint, tiny_package):
    from diffrt.rng import Generator

    folder, package = tiny_checkpoint("sd15"), tiny_package("sd15")
    ref = reference(folder, "EulerAncestralDiscreteScheduler", {})
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64, num_images_per_prompt=2)
    expected = ref(generator=gens, output_type="np", **kwargs).images
    pipe = ours_for(package, "EulerAncestralDiscreteScheduler", {})
    got = pipe(generator=[Generator().manual_seed(3), Generator().manual_seed(4)], output_type="np", **kwargs).images
    assert_close(expected, got)


def test_pil_output_and_latent_output(tiny_package):
    pipe = ours_for(tiny_package("sd15"))
    pil = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=0).images[0]
    assert pil.size == (64, 64) and pil.mode == "RGB"
    latents = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=0, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
