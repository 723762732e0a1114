"""SD3 and FLUX packages behind the front ends users drive: `diffrt generate` / `diffrt info` as real processes,
and `diffrt serve` on 127.0.0.1 with the real `openai` client and A1111's API."""
from __future__ import annotations

import base64
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from cli_runner import one_line_error, run_cli
from serve_helpers import app_server, png_pixels

from diffrt.serve.config import ServeConfig

KEY = "sk-flow"


@pytest.fixture(scope="module")
def served(tiny_package):
    config = ServeConfig(packages=[str(tiny_package("flux_schnell")), str(tiny_package("sd3"))], api_key=KEY,
                         max_batch=4, batch_wait_ms=100)
    with app_server(config) as (base_url, _):
        yield base_url


def _pixels(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def test_openai_client_gets_the_flux_pipelines_images(served, tiny_package):
    from diffrt import FluxPipeline

    client = openai.OpenAI(api_key=KEY, base_url=f"{served}/v1", max_retries=0)
    result = client.images.generate(model="flux_schnell_package", prompt="a cat", n=2, size="96x64",
                                    response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 2, "negative_prompt": "ugly"})
    got = [png_pixels(base64.b64decode(item.b64_json)) for item in result.data]
    pipe = FluxPipeline.from_pretrained(tiny_package("flux_schnell"))
    expected = pipe(["a cat"] * 2, negative_prompt=["ugly"] * 2, generator=[5, 6], num_inference_steps=2,
                    height=64, width=96).images
    for ours, want in zip(got, _pixels(expected)):
        np.testing.assert_array_equal(ours, want)


def test_a1111_txt2img_on_sd3_takes_euler_and_names_other_samplers(served):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "a cat", "steps": 2, "width": 96, "height": 64, "seed": 5, "cfg_scale": 3.0,
            "override_settings": {"sd_model_checkpoint": "sd3_package"}}
    ok = httpx.post(f"{served}/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler Karras"}, headers=headers,
                    timeout=120)
    assert ok.status_code == 200, ok.text
    assert png_pixels(base64.b64decode(ok.json()["images"][0])).shape == (64, 96, 3)
    refused = httpx.post(f"{served}/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M"},
                         headers=headers, timeout=120)
    assert refused.status_code in (400, 422) and "flow-matching" in refused.text


def test_generate_command_makes_the_sd3_pipelines_image(tiny_package, tmp_path: Path):
    from PIL import Image

    from diffrt import StableDiffusion3Pipeline

    package = tiny_package("sd3")
    result = run_cli("generate", package, "a red cat", "--steps", "2", "--guidance", "4", "--width", "96",
                     "--height", "64", "--seed", "11", "-o", "cat.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pipe = StableDiffusion3Pipeline.from_pretrained(package)
    want = pipe("a red cat", generator=11, num_inference_steps=2, guidance_scale=4.0, height=64, width=96).images
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cat.png").convert("RGB")), _pixels(want)[0])
    refused = run_cli("generate", package, "a cat", "--timesteps", "999,500", cwd=tmp_path)
    assert refused.returncode == 2
    one_line_error(refused.stderr, "generate", "`--timesteps`", "StableDiffusion3Pipeline")


def test_info_lists_the_transformer_and_t5_components(tiny_package):
    result = run_cli("info", tiny_package("sd35"))
    assert result.returncode == 0, result.stderr
    for name in ("StableDiffusion3Pipeline", "transformer", "text_encoder_3", "out_hidden_states"):
        assert name in result.stdout
