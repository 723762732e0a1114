"""SD3 / SD3.5 and FLUX.1 packages exported from tiny random-weight checkpoints, run torch-free, against Diffusers'
own pipelines on the same checkpoints: same seeds -> the same images within 1e-3 (on [0, 1] pixels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffrt import Generator
from diffrt.errors import InputError

TOLERANCE = 1e-3
SIZE = {"height": 64, "width": 96}  # latents 8 x 12: SD3's patch grid 4 x 6, FLUX's 24 packed tokens


def _reference(checkpoint: Path, **components):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(str(checkpoint), **components)


def _generators(count: int, torch_side: bool):
    if torch_side:
        import torch

        return [torch.Generator().manual_seed(seed) for seed in range(count)]
    return [Generator().manual_seed(seed) for seed in range(count)]


def _compare(ours_pipe, reference, **call):
    count = len(call["prompt"]) if isinstance(call["prompt"], list) else 1
    count *= call.get("num_images_per_prompt", 1)
    ours = ours_pipe(**call, output_type="np", generator=_generators(count, False)).images
    theirs = reference(**call, output_type="np", generator=_generators(count, True)).images
    assert ours.shape == theirs.shape
    assert np.abs(ours - np.asarray(theirs)).max() < TOLERANCE
    assert ours.std() > 0.01  # an image, not a constant
    return ours


@pytest.fixture(scope="session")
def flow_package(tiny_package):
    return tiny_package


@pytest.mark.parametrize("kind", ["sd3", "sd35"])
def test_sd3_text_to_image_matches_diffusers(kind, tiny_checkpoint, flow_package):
    from diffrt import DiffusionPipeline, StableDiffusion3Pipeline

    pipe = DiffusionPipeline.from_pretrained(flow_package(kind))
    assert isinstance(pipe, StableDiffusion3Pipeline)
    _compare(pipe, _reference(tiny_checkpoint(kind)), prompt=["a photo of a cat", "a red dog"],
             negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, max_sequence_length=20, **SIZE)


def test_sd3_package_without_t5_runs_as_diffusers_without_text_encoder_3(tiny_checkpoint, tmp_path):
    """Zeros stand in for the T5 tokens, as in Diffusers with `text_encoder_3=None`."""
    from diffrt import StableDiffusion3Pipeline
    from diffrt.export import export_pipeline

    package = export_pipeline(tiny_checkpoint("sd3"), tmp_path / "no_t5",
                              components=["text_encoder", "text_encoder_2", "transformer", "vae_decoder"])
    pipe = StableDiffusion3Pipeline.from_pretrained(package)
    assert pipe.text_encoder_3 is None
    reference = _reference(tiny_checkpoint("sd3"), text_encoder_3=None, tokenizer_3=None)
    _compare(pipe, reference, prompt=["a cat"], num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16,
             **SIZE)


def test_sd3_image_to_image_matches_diffusers(tiny_checkpoint, flow_package):
    import diffusers

    from diffrt import StableDiffusion3Img2ImgPipeline

    image = np.random.default_rng(0).random((1, 64, 96, 3), dtype=np.float32)
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(flow_package("sd3"))
    reference = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(str(tiny_checkpoint("sd3")))
    _compare(pipe, reference, prompt=["a cat"], image=image, strength=0.7, num_inference_steps=5,
             guidance_scale=3.0, max_sequence_length=12, **SIZE)
    # Without a size, Diffusers resizes the image to the model's default size; so does diffrt.
    call = dict(prompt="a cat", image=image, num_inference_steps=2, max_sequence_length=8, output_type="np")
    assert pipe(**call).images.shape == (1, pipe.default_size(), pipe.default_size(), 3)


def test_sd3_encode_prompt_gives_clip_then_t5_tokens(flow_package):
    from diffrt import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(flow_package("sd3"))
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a cat", num_images_per_prompt=2,
                                                                   max_sequence_length=10)
    joint = pipe.transformer.config["joint_attention_dim"]
    assert embeds.shape == negative.shape == (2, 77 + 10, joint)
    assert pooled.shape == negative_pooled.shape == (2, pipe.transformer.config["pooled_projection_dim"])
    embeds, negative, _, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False, max_sequence_length=10)
    assert negative is None and embeds.shape == (1, 87, joint)


@pytest.mark.parametrize("kind", ["flux_dev", "flux_schnell"])
def test_flux_text_to_image_matches_diffusers(kind, tiny_checkpoint, flow_package):
    from diffrt import DiffusionPipeline, FluxPipeline

    pipe = DiffusionPipeline.from_pretrained(flow_package(kind))
    assert isinstance(pipe, FluxPipeline)
    _compare(pipe, _reference(tiny_checkpoint(kind)), prompt=["a photo of a cat", "a red dog"],
             num_inference_steps=3, guidance_scale=3.5, max_sequence_length=16, **SIZE)


def test_flux_true_cfg_with_a_negative_prompt_matches_diffusers(tiny_checkpoint, flow_package):
    from diffrt import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flow_package("flux_schnell"))
    _compare(pipe, _reference(tiny_checkpoint("flux_schnell")), prompt="a cat", negative_prompt="ugly",
             true_cfg_scale=2.5, num_images_per_prompt=2, num_inference_steps=2, max_sequence_length=12, **SIZE)


def test_flux_image_to_image_matches_diffusers(tiny_checkpoint, flow_package):
    import diffusers

    from diffrt import FluxImg2ImgPipeline

    image = np.random.default_rng(1).random((1, 64, 96, 3), dtype=np.float32)
    pipe = FluxImg2ImgPipeline.from_pretrained(flow_package("flux_dev"))
    reference = diffusers.FluxImg2ImgPipeline.from_pretrained(str(tiny_checkpoint("flux_dev")))
    _compare(pipe, reference, prompt=["a cat"], image=image, strength=0.6, num_inference_steps=5,
             guidance_scale=3.5, max_sequence_length=12, **SIZE)


def test_flux_latent_output_is_packed_as_in_diffusers(tiny_checkpoint, flow_package):
    from diffrt import FluxPipeline
    from diffrt.runtime.pipelines.flux import pack_latents, unpack_latents

    pipe = FluxPipeline.from_pretrained(flow_package("flux_dev"))
    call = dict(prompt="a cat", num_inference_steps=2, max_sequence_length=8, output_type="latent", **SIZE)
    ours = pipe(**call, generator=Generator().manual_seed(3)).images
    import torch

    theirs = _reference(tiny_checkpoint("flux_dev"))(**call, generator=torch.Generator().manual_seed(3)).images
    assert ours.shape == (1, 24, 16) and np.abs(ours - theirs.numpy()).max() < TOLERANCE
    assert np.array_equal(pack_latents(unpack_latents(ours, 8, 12)), ours)


def test_auto_pipelines_pick_the_flow_families(flow_package):
    from diffrt import AutoPipelineForImage2Image, AutoPipelineForText2Image
    from diffrt.runtime.pipelines.flux import FluxImg2ImgPipeline
    from diffrt.runtime.pipelines.sd3 import StableDiffusion3Pipeline

    assert isinstance(AutoPipelineForText2Image.from_pretrained(flow_package("sd35")), StableDiffusion3Pipeline)
    assert isinstance(AutoPipelineForImage2Image.from_pretrained(flow_package("flux_dev")), FluxImg2ImgPipeline)


@pytest.mark.parametrize(("kind", "call", "named"), [
    ("sd3", {"max_sequence_length": 600}, "`max_sequence_length`"),
    ("sd3", {"skip_guidance_layers": [7, 8]}, "`skip_guidance_layers`"),
    ("sd3", {"height": 72}, "`height`"),  # not a multiple of 16 (VAE factor 8 x patch 2)
    ("sd3", {"guidance_scale": float("nan")}, "`guidance_scale`"),
    ("sd3", {"mu": float("nan")}, "`mu`"),
    ("flux_dev", {"max_sequence_length": 0}, "`max_sequence_length`"),
    ("flux_dev", {"true_cfg_scale": float("nan")}, "`true_cfg_scale`"),
    ("flux_dev", {"joint_attention_kwargs": {"scale": 0.5}}, "`joint_attention_kwargs`"),
    ("flux_dev", {"latents": np.zeros((1, 24, 15), np.float32)}, "`latents`"),
])
def test_bad_arguments_are_named_before_any_engine_runs(kind, call, named, flow_package):
    from diffrt import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(flow_package(kind))
    arguments = {"prompt": "a cat", "num_inference_steps": 1, **SIZE, **call}
    with pytest.raises(InputError, match=named):
        pipe(**arguments)
    assert pipe._engines == {}  # refused before any engine was created


def test_custom_sigmas_and_mu_reach_the_schedule_as_in_diffusers(tiny_checkpoint, flow_package):
    """FLUX dev shifts the caller's sigmas by `mu`, computed from the image's tokens as Diffusers does; diffrt also
    takes `mu` itself (SD3's argument, which Diffusers' FluxPipeline lacks)."""
    from diffrt import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flow_package("flux_dev"))
    reference = _reference(tiny_checkpoint("flux_dev"))
    call = dict(prompt=["a cat"], sigmas=[1.0, 0.75, 0.5, 0.25], max_sequence_length=8, num_inference_steps=4,
                **SIZE)
    default_mu = _compare(pipe, reference, **call)
    given_mu = pipe(**call, mu=1.1, output_type="np", generator=_generators(1, False)).images
    assert np.abs(default_mu - given_mu).max() > 1e-3  # mu changed the schedule


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd35", "flux_dev"])
def test_fp16_packages_validate_and_stay_close_to_fp32(kind, tiny_checkpoint, flow_package, tmp_path):
    """fp16 exports pass their own validation (the transformer's bound: `precision.COMPONENT_TOLERANCE`) and give
    the fp32 package's image within 40 dB (measured 68.8 dB for SD3.5, 68.7 dB for FLUX.1-dev); bf16 runs on
    OpenVINO (ONNX Runtime's CPU provider has few bf16 kernels) within 35 dB (measured 42 dB)."""
    from diffrt import DiffusionPipeline
    from diffrt.export import export_pipeline
    from diffrt.runtime.engines.openvino import bf16_support, openvino_available

    call = dict(prompt="a cat", num_inference_steps=3, max_sequence_length=16, output_type="np", generator=1,
                **SIZE)
    base = DiffusionPipeline.from_pretrained(flow_package(kind))(**call).images
    fp16 = export_pipeline(tiny_checkpoint(kind), tmp_path / "fp16", precision="fp16")
    assert _psnr(DiffusionPipeline.from_pretrained(fp16)(**call).images, base) > 40
    if openvino_available() and bf16_support()[0]:  # bf16 kernels: avx512_bf16 or AMX (elsewhere refused, tested)
        bf16 = export_pipeline(tiny_checkpoint(kind), tmp_path / "bf16", precision="bf16")
        image = DiffusionPipeline.from_pretrained(bf16, provider="openvino", inference_precision="bf16")(**call).images
        assert _psnr(image, base) > 35
