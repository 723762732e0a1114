"""Prompts on the server read as AUTOMATIC1111 reads them (emphasis, BREAK, long prompts), as A1111's API clients
expect, over real HTTP: the images equal the pipeline called with `prompt_weighting="a1111"`; requests whose prompts
take different numbers of 77-token chunks never share a call (padding would change the shorter one's image); a prompt
longer than the package takes is a 400 naming `prompt`; `prompt_weighting=None` serves Diffusers' plain prompts."""
from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest
from serve_helpers import app_server, b64_pixels

from diffrt.runtime import DiffusionPipeline
from diffrt.serve.config import ServeConfig

SIZE, STEPS = 32, 4
WEIGHTED = "a (handwritten:1.4) seven BREAK [[three]]"
LONG = ", ".join(["a handwritten seven"] * 30)  # > 75 tokens: two chunks


@pytest.fixture(scope="module")
def pipe():
    pipe = DiffusionPipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct(pipe, prompt, seed, weighting="a1111"):
    return np.asarray(pipe(prompt, generator=seed, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                           prompt_weighting=weighting).images[0])


def generate(base_url, prompt, seed):
    body = {"model": "digits", "prompt": prompt, "size": f"{SIZE}x{SIZE}", "response_format": "b64_json",
            "seed": seed, "steps": STEPS}
    return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=300)


@pytest.fixture(scope="module")
def base_url():
    config = ServeConfig(packages=["digits"], max_batch=8, batch_wait_ms=400, max_prompt_chars=20000)
    with app_server(config) as (url, _):
        yield url


def test_a_weighted_prompt_makes_the_pipelines_weighted_image(base_url, pipe):
    response = generate(base_url, WEIGHTED, 11)
    assert response.status_code == 200, response.text
    got = b64_pixels(response.json()["data"][0]["b64_json"])
    np.testing.assert_array_equal(got, direct(pipe, WEIGHTED, 11))
    assert np.abs(got.astype(int) - direct(pipe, WEIGHTED, 11, weighting=None).astype(int)).max() > 0


def test_prompts_of_other_chunk_counts_run_in_their_own_calls(base_url, pipe):
    prompts = [("seven", 1), (LONG, 2), ("three", 3)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda item: generate(base_url, *item), prompts))
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    sizes = [r.headers["X-Diffrt-Batch-Size"] for r in responses]
    assert sizes[1] == "1" and sizes[0] == sizes[2] == "2", sizes  # the two one-chunk prompts shared a call
    for (prompt, seed), response in zip(prompts, responses):
        np.testing.assert_array_equal(b64_pixels(response.json()["data"][0]["b64_json"]), direct(pipe, prompt, seed))


def test_a_prompt_longer_than_the_package_takes_is_refused_by_name(base_url):
    response = generate(base_url, " ".join(["seven"] * 400), 1)  # 6 chunks; digits' UNet takes 4
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "at most 4" in error["message"]


def test_a_server_with_plain_prompts_reads_them_as_diffusers_does(pipe):
    config = ServeConfig(packages=["digits"], max_batch=1, prompt_weighting=None)
    with app_server(config) as (url, _):
        response = generate(url, WEIGHTED, 11)
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(b64_pixels(response.json()["data"][0]["b64_json"]),
                                  direct(pipe, WEIGHTED, 11, weighting=None))
