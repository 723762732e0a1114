"""DeepCache behind `diffrt serve`: the `deep_cache_interval` field (OpenAI's through the `openai` client's
`extra_body`, A1111's as a JSON field) and the server's `--deep-cache` default, over real HTTP on 127.0.0.1. A served
image equals the pipeline's own with the same interval (exact), and errors name the field."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import app_server, b64_pixels, png_pixels, png_text

from diffrt.errors import InputError
from diffrt.runtime.image_files import JSON_KEY
from diffrt.serve.config import ServeConfig

SIZE, STEPS, PROMPT = 32, 6, "a red cube"


@pytest.fixture(scope="module")
def packages(tiny_deep_cache_package, tiny_package):
    return {"cached": tiny_deep_cache_package("sd15"), "plain": tiny_package("sd15")}


@pytest.fixture(scope="module")
def direct(packages):
    """`direct(interval, seed)`: the deep-cache package's image made by the pipeline called directly."""
    from diffrt.runtime.pipelines.auto import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(packages["cached"])
    pipe.set_progress_bar_config(disable=True)

    def make(interval, seed, schedule="uniform"):
        pipe.deep_cache_schedule = schedule
        image = pipe(PROMPT, generator=seed, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                     deep_cache_interval=interval).images[0]
        return np.asarray(image.convert("RGB"))

    return make


def served(packages, **options):
    return app_server(ServeConfig(packages=[str(packages["cached"]), str(packages["plain"])], max_batch=4,
                                  batch_wait_ms=200, max_steps=40, **options))


def test_the_request_field_runs_deepcache_as_the_pipeline_does(packages, direct):
    with served(packages) as (base_url, _):
        client = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0)
        model = packages["cached"].name
        answers = {interval: client.images.generate(
            model=model, prompt=PROMPT, size=f"{SIZE}x{SIZE}", response_format="b64_json",
            extra_body={"seed": 5, "steps": STEPS, "deep_cache_interval": interval}) for interval in (1, 3)}
        cached = base64.b64decode(answers[3].data[0].b64_json)
        np.testing.assert_array_equal(png_pixels(cached), direct(3, 5))
        np.testing.assert_array_equal(png_pixels(base64.b64decode(answers[1].data[0].b64_json)), direct(None, 5))
        assert not np.array_equal(direct(3, 5), direct(None, 5))  # the cache changed the image
        assert json.loads(png_text(cached)[JSON_KEY])["deep_cache_interval"] == 3  # `generate --from-png` reads it

        body = {"prompt": PROMPT, "seed": 5, "steps": STEPS, "width": SIZE, "height": SIZE, "cfg_scale": 7.5,
                "override_settings": {"sd_model_checkpoint": model}, "deep_cache_interval": 3}
        answer = httpx.post(f"{base_url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(b64_pixels(answer.json()["images"][0]), direct(3, 5))


@pytest.mark.parametrize("interval, fragment", [(0, "must be in [1, 40]"), (41, "must be in [1, 40]")])
def test_bad_intervals_and_packages_without_deepcache_are_400_naming_the_field(packages, interval, fragment):
    with served(packages) as (base_url, _):
        body = {"prompt": PROMPT, "seed": 1, "steps": STEPS, "width": SIZE, "height": SIZE}
        for extra, expected in (({"deep_cache_interval": interval}, fragment),
                                ({"deep_cache_interval": 2, "override_settings": {
                                    "sd_model_checkpoint": packages["plain"].name}}, "exported with DeepCache")):
            answer = httpx.post(f"{base_url}/sdapi/v1/txt2img", json={**body, **extra}, timeout=120)
            assert answer.status_code == 400, answer.text
            assert "deep_cache_interval" in answer.text and expected in answer.text, answer.text


def test_the_server_default_applies_where_a_request_does_not_say(packages, direct):
    config = ServeConfig(packages=[str(packages["cached"])], deep_cache=3, max_steps=40)
    with app_server(config) as (base_url, _):
        client = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0)
        for extra, interval in (({}, 3), ({"deep_cache_interval": 1}, None)):
            answer = client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                            extra_body={"seed": 9, "steps": STEPS, **extra})
            np.testing.assert_array_equal(png_pixels(base64.b64decode(answer.data[0].b64_json)), direct(interval, 9))


def test_the_server_schedule_picks_the_full_steps_as_the_pipeline_does(packages, direct):
    config = ServeConfig(packages=[str(packages["cached"])], deep_cache=3, deep_cache_schedule="nonuniform",
                         max_steps=40)
    with app_server(config) as (base_url, _):
        client = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0)
        answer = client.images.generate(prompt=PROMPT, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                        extra_body={"seed": 9, "steps": STEPS})
        png = base64.b64decode(answer.data[0].b64_json)
    np.testing.assert_array_equal(png_pixels(png), direct(3, 9, "nonuniform"))
    assert not np.array_equal(direct(3, 9, "nonuniform"), direct(3, 9))
    record = json.loads(png_text(png)[JSON_KEY])
    assert record["deep_cache_interval"] == 3 and record["deep_cache_schedule"] == "nonuniform"


def test_a_default_for_a_package_exported_without_deepcache_is_refused_at_start(packages):
    from diffrt.serve.app import create_app

    with pytest.raises(InputError, match=r"`--deep-cache` 3 applies to every served package.*--deep-cache"):
        create_app(ServeConfig(packages=[str(packages["cached"]), str(packages["plain"])], deep_cache=3))
