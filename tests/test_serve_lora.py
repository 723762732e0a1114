"""Per-request LoRAs on `diffrt serve --lora-dir` (issue #15), over real HTTP with the real `openai` and `webuiapi`
clients: A1111's `<lora:NAME:WEIGHT>` tags and diffrt's `loras` field apply LoRA files by name; the image equals the
Python API with the same LoRA (exact) and `diffrt generate --lora` (exact); requests with other LoRA sets never share
a batch; an LRU of adapted pipelines shows its builds, hits and evictions in /metrics; errors are 400s naming the
field. LoRA files are built for real with PEFT / Diffusers (tests/lora_files.py) on the tiny SD 1.5 checkpoint.
"""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import shutil

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from serve_helpers import app_server, b64_pixels, metric, png_pixels, png_text

from diffrt.runtime import DiffusionPipeline
from diffrt.runtime.infotext import parse_infotext
from diffrt.serve.config import ServeConfig

pytest.importorskip("peft")
from lora_files import kohya_lora, peft_lora  # noqa: E402

SIZE, STEPS, GUIDANCE = 64, 3, 7.5
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint, tmp_path_factory):
    """A1111's models/Lora: `style` (kohya naming), `sub/detail` (PEFT naming, one folder down), `misfit` (keys
    matching no weight of the package) and `ink` (style's tensors, with the alias "inkwash" in its metadata)."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("Lora")
    build = tmp_path_factory.mktemp("lora-build")
    checkpoint = tiny_checkpoint("sd15")
    kohya_lora(peft_lora(checkpoint, "sd15", build / "a", seed=1), "sd15", root / "style.safetensors")
    (root / "sub").mkdir()
    shutil.copy(peft_lora(checkpoint, "sd15", build / "b", seed=2), root / "sub" / "detail.safetensors")
    tensors = load_file(str(root / "style.safetensors"))
    save_file({key.replace("lora_unet_", "lora_unet_no_such_"): value for key, value in tensors.items()},
              str(root / "misfit.safetensors"))
    save_file(tensors, str(root / "ink.safetensors"), metadata={"ss_output_name": "inkwash"})
    return root


@pytest.fixture(scope="module")
def package(tiny_package):
    return tiny_package("sd15")


@pytest.fixture(scope="module")
def base_url(package, lora_dir):
    config = ServeConfig(packages=[str(package)], lora_dirs=[lora_dir], lora_cache=2, max_batch=8,
                         batch_wait_ms=400)
    with app_server(config) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(api_key="unused", base_url=f"{base_url}/v1", max_retries=0)


@pytest.fixture(scope="module")
def a1111(base_url):
    host, port = base_url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), steps=STEPS)


_PIPES: dict = {}


def direct(package, loras: tuple[tuple[str, float], ...], seed: int, scheduler: str | None = None) -> np.ndarray:
    """The Python API's image: the package with `loras` (file, weight) loaded and set, as a user would."""
    from diffrt.runtime.generation import scheduler_for

    if (loras, scheduler) not in _PIPES:
        pipe = DiffusionPipeline.from_pretrained(package)
        pipe.set_progress_bar_config(disable=True)
        if scheduler:
            pipe.scheduler = scheduler_for(pipe.scheduler.config, scheduler)
        for index, (path, _) in enumerate(loras):
            pipe.load_lora_weights(path, adapter_name=f"a{index}")
        if loras:
            pipe.set_adapters([f"a{i}" for i in range(len(loras))], [weight for _, weight in loras])
        _PIPES[loras, scheduler] = pipe
    image = _PIPES[loras, scheduler](PROMPT, generator=seed, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                     height=SIZE, width=SIZE, prompt_weighting="a1111").images[0]
    return np.asarray(image.convert("RGB"))


def generate(client, prompt, seed, **extra):
    result = client.images.generate(prompt=prompt, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                    extra_body={"seed": seed, "steps": STEPS, "guidance_scale": GUIDANCE, **extra})
    return base64.b64decode(result.data[0].b64_json)


def a1111_hash(path) -> str:
    """A1111's Lora shorthash, derived here from the format: sha256 of the bytes after the safetensors header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


# ----- applying -----
def test_a1111_tag_applies_the_lora_and_the_infotext_keeps_the_prompt_with_lora_hashes(a1111, package, lora_dir):
    prompt = f"{PROMPT} <lora:style:0.8>"
    result = a1111.txt2img(prompt=prompt, seed=3, width=SIZE, height=SIZE, cfg_scale=GUIDANCE, sampler_name="Euler")
    got = np.asarray(result.image.convert("RGB"))
    style = str(lora_dir / "style.safetensors")
    np.testing.assert_array_equal(got, direct(package, ((style, 0.8),), 3, "Euler"))
    assert np.abs(got.astype(int) - direct(package, (), 3, "Euler").astype(int)).max() > 0  # the LoRA changed the image
    info = parse_infotext(result.info["infotexts"][0])
    assert info.prompt == prompt  # as sent, tag included (A1111)
    assert info.fields["Lora hashes"] == f"style: {a1111_hash(lora_dir / 'style.safetensors')}"
    assert result.info["extra_generation_params"] == {"Lora hashes": info.fields["Lora hashes"]}
    assert result.info["all_prompts"] == [prompt]


def test_openai_loras_field_and_tag_agree_and_weight_zero_is_the_base_image(client, package, lora_dir):
    detail = str(lora_dir / "sub" / "detail.safetensors")
    by_field = png_pixels(generate(client, PROMPT, 4, loras=[{"name": "detail", "weight": -0.6}]))
    by_tag = png_pixels(generate(client, f"<lora:detail:-0.6>{PROMPT}", 4))
    np.testing.assert_array_equal(by_field, direct(package, ((detail, -0.6),), 4))
    np.testing.assert_array_equal(by_tag, by_field)
    zero = generate(client, f"{PROMPT}<lora:detail:0>", 4)
    np.testing.assert_array_equal(png_pixels(zero), direct(package, (), 4))
    assert "Lora hashes: \"detail: " in png_text(zero)["parameters"]  # still named, as A1111 does


def test_separate_text_encoder_and_unet_weights_and_aliases_follow_a1111(client, package, lora_dir):
    got = png_pixels(generate(client, f"{PROMPT} <lora:inkwash:0.3:-0.7>", 6))  # by alias, as A1111 allows
    pipe = DiffusionPipeline.from_pretrained(package)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir / "ink.safetensors", adapter_name="ink")
    pipe.set_adapters("ink", {"text_encoder": 0.3, "unet": -0.7})
    want = pipe(PROMPT, generator=6, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                prompt_weighting="a1111").images[0]
    np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))
    style = str(lora_dir / "style.safetensors")
    assert np.abs(got.astype(int) - direct(package, ((style, 0.3),), 6).astype(int)).max() > 0


def test_the_server_image_equals_diffrt_generate_with_the_same_lora(client, package, lora_dir, tmp_path):
    from cli_runner import run_cli

    style = lora_dir / "style.safetensors"
    served = png_pixels(generate(client, f"{PROMPT} <lora:style:0.8>", 5))
    result = run_cli("generate", package, PROMPT, "--lora", f"{style}:0.8", "--seed", "5", "--steps", str(STEPS),
                     "--guidance", str(GUIDANCE), "--height", str(SIZE), "--width", str(SIZE),
                     "-o", tmp_path / "cli.png")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(served, png_pixels((tmp_path / "cli.png").read_bytes()))


def test_requests_with_different_loras_in_flight_never_share_a_batch(client, base_url, package, lora_dir):
    style, detail = str(lora_dir / "style.safetensors"), str(lora_dir / "sub" / "detail.safetensors")
    asks = [(f"{PROMPT} <lora:style:0.5>", 11, ((style, 0.5),)), (f"{PROMPT} <lora:style:0.5>", 12, ((style, 0.5),)),
            (f"{PROMPT} <lora:detail:0.5>", 13, ((detail, 0.5),)), (PROMPT, 14, ())]

    def ask(item):
        body = {"prompt": item[0], "size": f"{SIZE}x{SIZE}", "response_format": "b64_json", "seed": item[1],
                "steps": STEPS, "guidance_scale": GUIDANCE}
        return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        responses = list(pool.map(ask, asks))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.headers["X-Diffrt-Batch-Size"] for r in responses] == ["2", "2", "1", "1"]
    for (_, seed, loras), response in zip(asks, responses):
        np.testing.assert_array_equal(b64_pixels(response.json()["data"][0]["b64_json"]),
                                      direct(package, loras, seed))


def test_the_lru_reuses_popular_sets_and_evicts_the_least_recently_used(client, base_url, package):
    name = package.name
    counts = ("diffrt_lora_pipeline_builds_total", "diffrt_lora_cache_hits_total",
              "diffrt_lora_cache_evictions_total")

    def after(prompt):
        before = [metric(base_url, key, package=name) for key in counts]
        generate(client, prompt, 1)
        return tuple(int(metric(base_url, key, package=name) - old) for key, old in zip(counts, before))

    x, y, z = (f"{PROMPT} <lora:style:{w}>" for w in (0.31, 0.32, 0.33))
    after(x)
    after(y)  # the cache (2) holds x, y
    assert after(x) == (0, 1, 0)  # hit; y is now the least recently used
    assert after(z) == (1, 0, 1)  # built; y evicted
    assert after(x) == (0, 1, 0)
    assert after(y) == (1, 0, 1)
    assert metric(base_url, "diffrt_lora_cached_pipelines", package=name) == 2


# ----- errors -----
def test_unknown_names_and_weights_that_are_not_finite_are_400s_naming_the_field(base_url):
    def ask(path, body):
        return httpx.post(f"{base_url}{path}", content=json.dumps(body), timeout=60,
                          headers={"Content-Type": "application/json"})

    response = ask("/v1/images/generations", {"prompt": f"{PROMPT} <lora:stlye:1>"})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt" and error["code"] == "lora_not_found"
    assert "'stlye'" in error["message"] and "available: style" in error["message"]
    response = ask("/v1/images/generations", {"prompt": PROMPT, "loras": [{"name": "nope", "weight": 1}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "loras"
    response = ask("/v1/images/generations", {"prompt": PROMPT, "loras": [{"name": "style", "weight": float("nan")}]})
    assert response.status_code == 400 and "`loras[0].weight` must be a finite number" in response.text
    response = ask("/v1/images/generations", {"prompt": f"{PROMPT} <lora:style:inf>"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = ask("/sdapi/v1/txt2img", {"prompt": f"{PROMPT} <lora:nope:1>", "steps": STEPS, "width": SIZE,
                                         "height": SIZE})
    assert response.status_code == 400  # A1111's error shape
    assert response.json()["error"] == "lora_not_found" and "`prompt`" in response.json()["detail"]


def test_a_lora_that_does_not_fit_the_package_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(client, f"{PROMPT} <lora:misfit:1>", 1)
    error = caught.value.body
    assert error["code"] == "lora_not_applicable" and error["param"] == "prompt"
    assert "'misfit'" in error["message"] and "match no weight" in error["message"]
    assert png_pixels(generate(client, PROMPT, 1)).shape == (SIZE, SIZE, 3)  # the server serves on


# ----- listing -----
def test_sdapi_loras_lists_the_folder_as_a1111_and_refresh_finds_new_files(a1111, base_url, lora_dir):
    listed = {entry["name"]: entry for entry in a1111.get_loras()}
    assert sorted(listed) == ["detail", "ink", "misfit", "style"]
    assert listed["ink"]["alias"] == "inkwash" and listed["ink"]["metadata"] == {"ss_output_name": "inkwash"}
    style = listed["style"]
    assert style["alias"] == "style" and style["path"] == str(lora_dir / "style.safetensors")
    assert style["metadata"] == {"ss_network_module": "networks.lora"}
    shutil.copy(lora_dir / "style.safetensors", lora_dir / "sub" / "added.safetensors")
    try:
        assert httpx.post(f"{base_url}/sdapi/v1/refresh-loras").status_code == 200
        assert "added" in {entry["name"] for entry in a1111.get_loras()}
    finally:
        (lora_dir / "sub" / "added.safetensors").unlink()
        httpx.post(f"{base_url}/sdapi/v1/refresh-loras")
