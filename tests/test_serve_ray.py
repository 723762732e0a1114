"""The Ray Serve application for real: a local Ray instance on 127.0.0.1, two replicas of `digits`, requests spread
over both, and the images the single-process server (and the pipeline) make for the same seeds."""
from __future__ import annotations

import concurrent.futures

import httpx
import numpy as np
import pytest
from serve_helpers import b64_pixels, free_port, wait_ready

from diffrt.serve.config import ServeConfig

pytestmark = pytest.mark.slow
BODY = {"model": "digits", "prompt": "a handwritten nine", "size": "32x32", "steps": 6, "response_format": "b64_json"}


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from diffrt.serve.ray_app import APP_NAME, build_app

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(packages=["digits"], max_batch=4, batch_wait_ms=50,
                             output_dir=tmp_path_factory.mktemp("ray-images"))
        serve.run(build_app(config, replicas=2, ray_actor_options={"num_cpus": 1}), name=APP_NAME, route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url)
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_share_the_requests_and_make_the_single_process_images(ray_server):
    from diffrt.runtime.pipelines.auto import AutoPipelineForText2Image

    seeds = list(range(40, 56))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: httpx.post(f"{ray_server}/v1/images/generations",
                                                          json={**BODY, "seed": seed}, timeout=120), seeds))
    assert [r.status_code for r in responses] == [200] * len(seeds), [r.text for r in responses]
    replicas = {r.headers["X-Diffrt-Replica"] for r in responses}
    assert len(replicas) == 2, replicas
    pipe = AutoPipelineForText2Image.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    for seed, response in zip(seeds, responses):
        want = pipe(BODY["prompt"], height=32, width=32, num_inference_steps=6, generator=[seed]).images[0]
        np.testing.assert_array_equal(b64_pixels(response.json()["data"][0]["b64_json"]), np.asarray(want))


def test_the_ray_ingress_serves_the_same_api(ray_server):
    assert httpx.get(f"{ray_server}/v1/models").json()["data"][0]["id"] == "digits"
    response = httpx.post(f"{ray_server}/sdapi/v1/txt2img", json={"prompt": "one", "width": 32, "height": 32,
                                                                  "steps": 2, "seed": 5}, timeout=120)
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    error = httpx.post(f"{ray_server}/v1/images/generations", json={**BODY, "size": "33x33"})
    assert error.status_code == 400 and error.json()["error"]["param"] == "size"
    assert httpx.get(f"{ray_server}/sdapi/v1/progress").json()["state"]["job_count"] == 0
