"""`diffrt serve` over real HTTP on 127.0.0.1, driven by the real clients: the official `openai` package
(base_url=...), `webuiapi` (AUTOMATIC1111's API) and httpx. Images are compared with the pipeline called directly
(same seed, same parameters): the server and batching must not change a pixel (tolerance: exact)."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image
from serve_helpers import app_server, b64_pixels, metric, png_pixels, png_text

from diffrt.runtime.infotext import parse_infotext
from diffrt.serve.config import ServeConfig

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZE, STEPS = 32, 6


@pytest.fixture(scope="module")
def served(tiny_package, tmp_path_factory):
    """(base URL, app) of a server with `digits` (the default) and a tiny SD 1.5-shaped package, batching on."""
    config = ServeConfig(packages=["digits", str(tiny_package("sd15"))], api_key=KEY, max_batch=8,
                         batch_wait_ms=300, max_upload_bytes=64 * 1024, max_pixels=256 * 256, max_steps=40,
                         max_images=4, max_prompt_chars=200, output_dir=tmp_path_factory.mktemp("served-images"))
    with app_server(config) as (base_url, app):
        yield base_url, app


@pytest.fixture(scope="module")
def base_url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(api_key=KEY, base_url=f"{base_url}/v1", max_retries=0)


_PIPES: dict = {}


def direct(package, prompt, seeds, *, negative="", steps=STEPS, guidance=7.5, size=SIZE, scheduler=None, task="t2i",
           **kwargs):
    """The images the pipeline makes called directly, one request alone (what the server must reproduce)."""
    from diffrt.runtime.generation import scheduler_for
    from diffrt.runtime.pipelines.auto import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    auto = {"t2i": AutoPipelineForText2Image, "i2i": AutoPipelineForImage2Image,
            "inpaint": AutoPipelineForInpainting}[task]
    key = (str(package), task, scheduler)
    if key not in _PIPES:
        pipe = auto.from_pretrained(package)
        if scheduler:
            pipe.scheduler = scheduler_for(pipe.scheduler.config, scheduler)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = pipe
    size_args = {"height": size, "width": size} if task == "t2i" else {}
    images = _PIPES[key]([prompt] * len(seeds), negative_prompt=[negative] * len(seeds), generator=list(seeds),
                         num_inference_steps=steps, guidance_scale=guidance, output_type="pil", **size_args,
                         **kwargs).images
    return [np.asarray(image.convert("RGB")) for image in images]


def post(base_url, path, body, headers=AUTH, **kwargs):
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=120, **kwargs)


# ----- OpenAI Images API -----
def test_openai_client_b64_images_equal_the_pipeline_with_seeds_and_infotext(client):
    result = client.images.generate(model="digits", prompt="a handwritten seven", n=2, size=f"{SIZE}x{SIZE}",
                                    response_format="b64_json", extra_body={"seed": 7, "steps": STEPS,
                                                                            "negative_prompt": "blurry"})
    assert len(result.data) == 2
    expected = direct("digits", "a handwritten seven", [7, 8], negative="blurry")
    for item, want, seed in zip(result.data, expected, (7, 8)):
        png = base64.b64decode(item.b64_json)
        np.testing.assert_array_equal(png_pixels(png), want)
        info = parse_infotext(png_text(png)["parameters"])
        assert (info.prompt, info.negative_prompt) == ("a handwritten seven", "blurry")
        assert info.fields["Seed"] == str(seed) and info.fields["Steps"] == str(STEPS)
        assert info.fields["Size"] == f"{SIZE}x{SIZE}" and info.fields["Model"] == "digits"


def test_openai_url_format_serves_the_image_from_the_output_folder(client, served):
    base_url, app = served
    result = client.images.generate(model="digits", prompt="a handwritten two", size=f"{SIZE}x{SIZE}",
                                    extra_body={"seed": 3, "steps": STEPS})  # OpenAI's default format: url
    url = result.data[0].url
    assert url.startswith(f"{base_url}/v1/images/files/")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(png_pixels(fetched.content), direct("digits", "a handwritten two", [3])[0])
    saved = app.state.server.outputs.path / url.rsplit("/", 1)[1]
    assert saved.read_bytes() == fetched.content
    for name in ("..%2F..%2Fetc%2Fpasswd", "notanimage.png", "0" * 32 + ".txt"):
        assert httpx.get(f"{base_url}/v1/images/files/{name}").status_code == 404


def test_openai_models_lists_every_served_package(client, tiny_package):
    assert [model.id for model in client.models.list()] == ["digits", tiny_package("sd15").name]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_edits_image_to_image_and_inpainting_equal_the_pipelines(client):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    result = client.images.edit(image=("init.png", _png_bytes(init), "image/png"), prompt="a handwritten one",
                                model="digits", response_format="b64_json",
                                extra_body={"seed": 5, "steps": STEPS, "strength": 0.6})
    want = direct("digits", "a handwritten one", [5], task="i2i", image=init, strength=0.6)[0]
    np.testing.assert_array_equal(b64_pixels(result.data[0].b64_json), want)
    # OpenAI's mask: fully transparent pixels are repainted -> Diffusers' white
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, SIZE // 2:] = 0
    mask = Image.fromarray(np.dstack([np.zeros((SIZE, SIZE, 3), np.uint8), alpha]), "RGBA")
    result = client.images.edit(image=("init.png", _png_bytes(init), "image/png"),
                                mask=("mask.png", _png_bytes(mask), "image/png"), prompt="a handwritten one",
                                model="digits", response_format="b64_json", extra_body={"seed": 5, "steps": STEPS})
    diffusers_mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    want = direct("digits", "a handwritten one", [5], task="inpaint", image=init, mask_image=diffusers_mask,
                  strength=1.0)[0]
    np.testing.assert_array_equal(b64_pixels(result.data[0].b64_json), want)


# ----- batching -----
def test_a_batch_of_mixed_requests_equals_each_request_alone(base_url):
    """Different prompts, negatives, seeds and image counts share one UNet call; each keeps its own images."""
    bodies = [{"model": "digits", "prompt": "a handwritten three", "n": 1, "seed": 100},
              {"model": "digits", "prompt": "a handwritten eight", "n": 2, "seed": 200, "negative_prompt": "thin"},
              {"model": "digits", "prompt": "zero", "n": 1, "seed": 300, "negative_prompt": "blurry"}]
    common = {"size": f"{SIZE}x{SIZE}", "steps": STEPS, "guidance_scale": 6.0, "response_format": "b64_json"}
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(base_url, "/v1/images/generations", {**body, **common}),
                                  bodies))
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    assert {r.headers["X-Diffrt-Batch-Size"] for r in responses} == {"4"}  # one pipeline call made all four
    for body, response in zip(bodies, responses):
        seeds = [body["seed"] + i for i in range(body["n"])]
        want = direct("digits", body["prompt"], seeds, negative=body.get("negative_prompt", ""), guidance=6.0)
        got = [b64_pixels(item["b64_json"]) for item in response.json()["data"]]
        assert len(got) == len(want)
        for image, expected in zip(got, want):
            np.testing.assert_array_equal(image, expected)


def test_requests_that_cannot_share_unet_calls_run_in_their_own_batches(base_url):
    common = {"model": "digits", "prompt": "seven", "size": f"{SIZE}x{SIZE}", "response_format": "b64_json"}
    bodies = [{**common, "steps": STEPS}, {**common, "steps": STEPS + 1}, {**common, "steps": STEPS,
                                                                            "guidance_scale": 3.0}]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(base_url, "/v1/images/generations", body), bodies))
    assert [r.headers["X-Diffrt-Batch-Size"] for r in responses] == ["1", "1", "1"]


# ----- AUTOMATIC1111 API through webuiapi -----
@pytest.fixture(scope="module")
def webui(base_url):
    port = int(base_url.rsplit(":", 1)[1])
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=STEPS)
    api.set_auth("anyone", KEY)
    return api


def test_webuiapi_txt2img_seeds_infotext_and_images_as_a1111(webui):
    result = webui.txt2img(prompt="a handwritten four", negative_prompt="blurry", seed=11, width=SIZE, height=SIZE,
                           batch_size=2, n_iter=2, cfg_scale=5.0)
    assert result.info["all_seeds"] == [11, 12, 13, 14]
    assert result.info["sd_model_name"] == "digits" and len(result.info["infotexts"]) == 4
    want = direct("digits", "a handwritten four", [11, 12, 13, 14], negative="blurry", guidance=5.0,
                  scheduler="Euler a")
    for image, expected, text, seed in zip(result.images, want, result.info["infotexts"], range(11, 15)):
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected)
        fields = parse_infotext(text).fields
        assert (fields["Sampler"], fields["Seed"], fields["CFG scale"]) == ("Euler a", str(seed), "5")
        assert image.info["parameters"] == text  # the PNG carries the infotext, as A1111's do
    assert result.parameters["prompt"] == "a handwritten four"


def test_webuiapi_img2img_and_inpainting_with_mask(webui):
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    result = webui.img2img(images=[init], prompt="a handwritten five", seed=21, width=SIZE, height=SIZE,
                           denoising_strength=0.5, sampler_name="Euler", cfg_scale=7.5)
    want = direct("digits", "a handwritten five", [21], task="i2i", image=init, strength=0.5, scheduler="Euler")
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), want[0])
    assert result.info["denoising_strength"] == 0.5
    mask = Image.fromarray(np.where(np.arange(SIZE)[None, :] < SIZE // 2, 255, 0).repeat(SIZE, 0).astype(np.uint8))
    result = webui.img2img(images=[init], mask_image=mask, prompt="a handwritten five", seed=21, width=SIZE,
                           height=SIZE, denoising_strength=0.9, sampler_name="Euler", cfg_scale=7.5)
    want = direct("digits", "a handwritten five", [21], task="inpaint", image=init, mask_image=mask, strength=0.9,
                  scheduler="Euler")
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), want[0])


def test_webuiapi_lists_samplers_schedulers_models_and_progress(webui, tiny_package):
    samplers = webui.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert {"automatic", "karras", "exponential", "sgm_uniform"} <= {s["name"] for s in webui.get_schedulers()}
    assert [m["model_name"] for m in webui.get_sd_models()] == ["digits", tiny_package("sd15").name]
    progress = webui.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    webui.util_wait_for_ready(check_interval=0.1)  # returns at once on an idle server


def test_sd_model_checkpoint_option_switches_the_package(webui, tiny_package, base_url):
    other = tiny_package("sd15")
    try:
        webui.util_set_model(other.name)
        assert webui.util_get_current_model().startswith(other.name)
        result = webui.txt2img(prompt="a cat", seed=4, width=SIZE, height=SIZE, sampler_name="Euler")
        assert result.info["sd_model_name"] == other.name
        np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")),
                                      direct(other, "a cat", [4], guidance=7.0, scheduler="Euler")[0])
        # override_settings picks a package for one request only
        one = post(base_url, "/sdapi/v1/txt2img", {"prompt": "a cat", "seed": 4, "width": SIZE, "height": SIZE,
                                                     "steps": STEPS, "override_settings":
                                                         {"sd_model_checkpoint": "digits"}})
        assert json.loads(one.json()["info"])["sd_model_name"] == "digits"
        assert webui.get_options()["sd_model_checkpoint"].startswith(other.name)
    finally:
        webui.set_options({"sd_model_checkpoint": "digits"})  # a package's plain name works too
    assert webui.util_get_current_model().startswith("digits")


# ----- service endpoints -----
def test_health_ready_and_metrics(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}  # probes need no key
    assert httpx.get(f"{base_url}/ready").json()["ready"] is True
    assert httpx.get(f"{base_url}/metrics").status_code == 401
    post(base_url, "/v1/images/generations", {"prompt": "nine", "size": f"{SIZE}x{SIZE}", "steps": STEPS,
                                              "response_format": "b64_json"})
    text = httpx.get(f"{base_url}/metrics", headers=AUTH).text
    for stage in ("queue_wait", "text_encoding", "unet", "vae"):
        assert f'diffrt_stage_seconds_count{{package="digits",stage="{stage}"}}' in text, stage
    assert "diffrt_queue_depth" in text and "diffrt_batch_size_bucket" in text
    assert metric(base_url, "diffrt_images_generated_total", AUTH, package="digits") >= 1
    assert metric(base_url, "diffrt_requests_total", AUTH, endpoint="/v1/images/generations", status="200") >= 1


# ----- errors: status, OpenAI's shape (A1111's under /sdapi), the parameter named -----
def _big_png() -> bytes:
    noise = np.random.default_rng(2).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    return _png_bytes(Image.fromarray(noise))  # ~200 kB of noise: over the 64 kB upload limit


OPENAI_ERRORS = [
    ({"prompt": "x", "size": "33x32"}, 400, "size"),
    ({"prompt": "x", "size": "512x512"}, 400, "size"),  # over --max-pixels
    ({"prompt": "x", "size": "big"}, 400, "size"),
    ({"prompt": "x", "steps": 41}, 400, "steps"),
    ({"prompt": "x", "steps": 0}, 400, "steps"),
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x" * 201}, 400, "prompt"),
    ({"prompt": "x", "negative_prompt": "y" * 201}, 400, "negative_prompt"),
    ({"prompt": "x", "scheduler": "Warp Drive"}, 400, "scheduler"),
    ({"prompt": "x", "response_format": "gif"}, 400, "response_format"),
    ({"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
    ({"prompt": "x", "seed": -5}, 400, "seed"),
    ({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
    ({"prompt": "x", "n": "many"}, 422, "n"),
    ({"n": 1}, 422, "prompt"),
]


@pytest.mark.parametrize("body,status,param", OPENAI_ERRORS, ids=[f"{s}-{p}" for _, s, p in OPENAI_ERRORS])
def test_openai_errors_name_the_parameter(base_url, body, status, param):
    response = post(base_url, "/v1/images/generations", {"size": f"{SIZE}x{SIZE}", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert param in error["message"]


def test_nan_is_refused_with_422(base_url):
    response = httpx.post(f"{base_url}/v1/images/generations", headers={**AUTH, "content-type": "application/json"},
                          content=b'{"prompt": "x", "guidance_scale": NaN}')
    assert response.status_code == 422 and response.json()["error"]["param"] == "guidance_scale"


def test_openai_client_raises_its_own_error_types(client, base_url):
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(model="digits", prompt="x", size="33x33")  # type: ignore[arg-type]
    assert error.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="missing", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=f"{base_url}/v1", max_retries=0).models.list()


def test_uploads_over_the_limit_are_413_and_non_images_400(client, base_url):
    with pytest.raises(openai.APIStatusError) as error:
        client.images.edit(image=("big.png", _big_png(), "image/png"), prompt="x", model="digits")
    assert error.value.status_code == 413 and error.value.body["param"] == "image"
    body = {"init_images": [base64.b64encode(_big_png()).decode()], "width": SIZE, "height": SIZE}
    response = post(base_url, "/sdapi/v1/img2img", body)
    assert response.status_code == 413 and "init_images" in response.json()["detail"]
    not_an_image = post(base_url, "/sdapi/v1/img2img", {"init_images": [base64.b64encode(b"GIF89a?").decode()]})
    assert not_an_image.status_code == 400 and "`init_images`" in not_an_image.json()["detail"]
    with pytest.raises(openai.BadRequestError) as error:
        client.images.edit(image=("x.png", b"not a png", "image/png"), prompt="x", model="digits")
    assert error.value.body["param"] == "image"
    # a body far over the limit is refused before it is read
    huge = post(base_url, "/sdapi/v1/img2img", {"init_images": ["A" * (2 * 1024 * 1024)]})
    assert huge.status_code == 413


def test_a1111_errors_have_a1111s_shape(base_url):
    response = post(base_url, "/sdapi/v1/txt2img", {"prompt": "x", "width": 30, "height": SIZE, "steps": 2})
    assert response.status_code == 400
    assert set(response.json()) == {"error", "detail", "body", "errors"} and "`width`" in response.json()["detail"]
    response = post(base_url, "/sdapi/v1/txt2img", {"prompt": "x", "width": SIZE, "height": SIZE, "steps": 2,
                                                     "sampler_name": "Euler", "scheduler": "Polyexponential"})
    assert response.status_code == 400 and "`scheduler`" in response.json()["detail"]
    response = post(base_url, "/sdapi/v1/options", {"sd_model_checkpoint": "sdxl-base"})
    assert response.status_code == 404 and "sd_model_checkpoint" in response.json()["detail"]
    assert post(base_url, "/sdapi/v1/txt2img", {"prompt": "x"}, headers={}).status_code == 401
    assert httpx.get(f"{base_url}/sdapi/v1/no-such-route", headers=AUTH).status_code == 404


def test_a_server_without_lora_dir_refuses_lora_tags_instead_of_ignoring_them(base_url):
    response = post(base_url, "/v1/images/generations", {"prompt": "a seven <lora:ink:0.8>", "steps": STEPS})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt" and error["code"] == "lora_not_enabled"
    assert "'ink'" in error["message"] and "--lora-dir" in error["message"]
    response = post(base_url, "/sdapi/v1/txt2img", {"prompt": "a seven", "loras": [{"name": "ink"}], "steps": STEPS})
    assert response.status_code == 400 and "`loras`" in response.json()["detail"]
    assert httpx.get(f"{base_url}/sdapi/v1/loras", headers=AUTH).json() == []


def test_cors_is_off_unless_configured_and_basic_auth_needs_the_key(base_url):
    preflight = httpx.options(f"{base_url}/v1/images/generations", headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    assert httpx.get(f"{base_url}/v1/models", auth=("user", "wrong")).status_code == 401
    assert httpx.get(f"{base_url}/v1/models", auth=("user", KEY)).status_code == 200
    assert httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Token {KEY}"}).status_code == 401


def test_a_servers_own_temporary_image_folder_goes_when_it_stops():
    """Without --output-dir, `url` images live in a private temporary folder, made when first needed and removed
    at shutdown; a folder the user named is kept (the module's server above writes into one)."""
    config = ServeConfig(packages=["digits"], max_batch=1)
    with app_server(config) as (base_url, app):
        outputs = app.state.server.outputs
        result = openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0).images.generate(
            model="digits", prompt="a handwritten one", size=f"{SIZE}x{SIZE}", extra_body={"steps": 2})
        folder = outputs.path
        assert (folder / result.data[0].url.rsplit("/", 1)[1]).is_file()
    assert not folder.exists()
