"""LCM-LoRA end to end (issue #15): the LoRA in LCM-LoRA's own file layout, `LCMScheduler` at 4 steps, guidance
scale 1 (no classifier-free guidance pass), against Diffusers doing the same:

    pipe.load_lora_weights("latent-consistency/lcm-lora-sdv1-5")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe(prompt, num_inference_steps=4, guidance_scale=1.0)

The file is built with random weights in the real layout (tests/lora_files.py `lcm_lora`), nothing is downloaded.
Tolerance: max abs diff <= 1e-3 on images in [0, 1], as every pipeline parity test.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lora_files import lcm_lora  # noqa: E402

from diffrt.runtime import DiffusionPipeline  # noqa: E402
from diffrt.schedulers import LCMScheduler  # noqa: E402

TOL = 1e-3
CALL = dict(prompt="a photo of a cat", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
            output_type="np")


@pytest.fixture(scope="module")
def lcm_files(tiny_checkpoint, tmp_path_factory):
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = lcm_lora(tiny_checkpoint(kind), kind, tmp_path_factory.mktemp(f"lcm-{kind}"))
        return built[kind]

    return get


def test_the_lcm_lora_file_has_lcm_loras_key_layout(lcm_files):
    from safetensors import safe_open

    with safe_open(str(lcm_files("sd15")), "np") as handle:
        keys = set(handle.keys())
    assert all(key.startswith("lora_unet_") for key in keys)
    for module in ("down_blocks_0_resnets_0_conv1", "down_blocks_0_resnets_0_time_emb_proj",
                   "down_blocks_0_downsamplers_0_conv", "up_blocks_0_upsamplers_0_conv",
                   "mid_block_attentions_0_transformer_blocks_0_attn1_to_q", "mid_block_attentions_0_proj_in"):
        assert {f"lora_unet_{module}.{role}" for role in ("lora_down.weight", "lora_up.weight", "alpha")} <= keys


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lcm_lora_with_lcm_scheduler_at_4_steps_matches_diffusers(kind, tiny_checkpoint, tiny_package, lcm_files):
    path = lcm_files(kind)
    ref = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(kind))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    pipe = DiffusionPipeline.from_pretrained(tiny_package(kind))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = np.asarray(ref(generator=torch.Generator().manual_seed(0), **CALL).images)
    got = np.asarray(pipe(generator=0, **CALL).images)
    diff = float(np.abs(expected - got).max())
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL:.0e}"
    assert pipe.do_classifier_free_guidance is False and ref.do_classifier_free_guidance is False
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}  # UNet only: the text encoder is not touched
    pipe.unload_lora_weights()
    without = np.asarray(pipe(generator=0, **CALL).images)
    assert float(np.abs(got - without).max()) > 10 * TOL  # the LoRA changed the image


def test_cli_lcm_sampler_with_the_lcm_lora_makes_the_python_api_image(tiny_package, lcm_files, tmp_path):
    from cli_runner import run_cli
    from PIL import Image

    path = lcm_files("sd15")
    result = run_cli("generate", tiny_package("sd15"), CALL["prompt"], "--steps", "4", "--guidance", "1",
                     "--height", "64", "--width", "64", "--seed", "3", "--sampler", "LCM", "--lora", str(path),
                     "-o", tmp_path / "lcm.png")
    assert result.returncode == 0, result.stderr
    got = np.asarray(Image.open(tmp_path / "lcm.png"), dtype=np.float32) / 255
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(path)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = np.asarray(pipe(generator=3, **CALL).images[0])
    assert float(np.abs(expected - got).max()) <= 1 / 255 + 1e-6  # 8-bit PNG rounding
