"""`diffrt serve` under pressure, over real HTTP on 127.0.0.1: a full queue (429 + Retry-After), timeouts (504),
clients that go away (their work is not computed), A1111's interrupt, engine errors (that request only), not ready
(503), SIGTERM (in-flight work finishes, exit 0)."""
from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import time

import httpx
import pytest
from serve_helpers import app_server, metric, serve_process, wait_until

from diffrt.runtime.builtin import resolve_builtin
from diffrt.serve.config import ServeConfig

SHORT = {"model": "digits", "prompt": "a handwritten one", "size": "32x32", "steps": 2, "response_format": "b64_json"}
LONG = {**SHORT, "size": "128x128", "steps": 150}  # ~0.1 s a step on this CPU: long enough to act while it runs
A1111_LONG = {"prompt": "a handwritten one", "width": 128, "height": 128, "steps": 150}


def config(**overrides) -> ServeConfig:
    return ServeConfig(**{"packages": ["digits"], "max_steps": 200, "max_batch": 1, "batch_wait_ms": 0,
                          "warmup": False, **overrides})


def generate(base_url: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=timeout)


def progress(base_url: str) -> dict:
    return httpx.get(f"{base_url}/sdapi/v1/progress").json()


def wait_running(base_url: str, step: int = 1) -> None:
    wait_until(lambda: progress(base_url)["state"]["sampling_step"] >= step)


def interrupt(base_url: str) -> None:
    assert httpx.post(f"{base_url}/sdapi/v1/interrupt").status_code == 200


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def test_interrupt_stops_the_running_job_at_the_next_step_and_returns_its_image(pool):
    with app_server(config()) as (base_url, _):
        running = pool.submit(httpx.post, f"{base_url}/sdapi/v1/txt2img", json=A1111_LONG, timeout=120)
        wait_running(base_url, step=2)
        now = progress(base_url)
        assert 0 < now["progress"] < 1 and now["eta_relative"] > 0 and now["state"]["sampling_steps"] == 150
        start = time.monotonic()
        interrupt(base_url)
        response = running.result(timeout=30)
        assert time.monotonic() - start < 5  # 150 steps take ~15 s: it stopped at the next step
        info = json.loads(response.json()["info"])
        assert response.status_code == 200 and info["interrupted"] is True and len(response.json()["images"]) == 1
        assert progress(base_url)["state"]["job_count"] == 0


def test_a_full_queue_answers_429_with_retry_after(pool):
    with app_server(config(max_queue=1)) as (base_url, _):
        running = pool.submit(generate, base_url, LONG)
        wait_running(base_url)
        queued = pool.submit(generate, base_url, SHORT)
        wait_until(lambda: metric(base_url, "diffrt_queue_depth", package="digits") == 1)
        refused = generate(base_url, SHORT)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        interrupt(base_url)
        assert running.result(timeout=30).status_code == 200
        assert queued.result(timeout=30).status_code == 200  # the queue drains; nothing was lost
        assert metric(base_url, "diffrt_requests_total", endpoint="/v1/images/generations", status="429") == 1


def test_a_request_past_its_timeout_gets_504_and_its_work_stops():
    with app_server(config(timeout=1.0)) as (base_url, _):
        start = time.monotonic()
        response = generate(base_url, LONG)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 5
        wait_until(lambda: metric(base_url, "diffrt_requests_cancelled_total", package="digits",
                                  when="while_running") == 1)
        assert metric(base_url, "diffrt_images_generated_total", package="digits") == 0
        assert generate(base_url, SHORT).status_code == 200  # the worker is free again at once


def test_a_client_that_goes_away_has_its_work_cancelled(pool):
    with app_server(config()) as (base_url, _):
        running = pool.submit(generate, base_url, LONG)
        wait_running(base_url)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the long one; the client gives up and hangs up
            generate(base_url, SHORT, timeout=0.5)
        interrupt(base_url)
        assert running.result(timeout=30).status_code == 200
        wait_until(lambda: metric(base_url, "diffrt_requests_cancelled_total", package="digits",
                                  when="before_start") == 1)
        # while running: a client that hangs up stops the steps of a batch nobody else waits for
        with pytest.raises(httpx.ReadTimeout):
            generate(base_url, LONG, timeout=1.0)
        wait_until(lambda: metric(base_url, "diffrt_requests_cancelled_total", package="digits",
                                  when="while_running") == 1)
        assert metric(base_url, "diffrt_images_generated_total", package="digits") == 1  # only the first request


def fail_at_run_time(package) -> None:
    """Make the package's UNet a valid graph, with the manifest's inputs and outputs and its files recorded anew
    (so opening the package finds nothing wrong), that fails inside ONNX Runtime when it runs: its output goes
    through a Reshape to 7 rows, which no latent batch divides into."""
    import onnx
    from onnx import helper

    from diffrt.package.writer import record_component_files

    path = package / "unet" / "model.onnx"
    model = onnx.load(path)
    graph = model.graph
    producer = next(node for node in graph.node if "out_sample" in node.output)
    producer.output[list(producer.output).index("out_sample")] = "unbroken"
    graph.initializer.append(helper.make_tensor("seven_rows", onnx.TensorProto.INT64, [2], [7, -1]))
    graph.node.extend([helper.make_node("Shape", ["unbroken"], ["unbroken_shape"]),
                       helper.make_node("Reshape", ["unbroken", "seven_rows"], ["seven"]),
                       helper.make_node("Reshape", ["seven", "unbroken_shape"], ["out_sample"])])
    onnx.save(model, path)
    manifest_path = package / "diffrt.json"
    manifest = json.loads(manifest_path.read_text())
    record_component_files(package, manifest["components"], ["unet"])
    manifest_path.write_text(json.dumps(manifest))


def test_an_engine_error_is_a_500_for_that_request_and_the_server_carries_on(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(resolve_builtin("digits"), broken)
    fail_at_run_time(broken)
    with app_server(config(packages=["digits", str(broken)])) as (base_url, _):
        response = generate(base_url, {**SHORT, "model": "broken"})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert generate(base_url, SHORT).status_code == 200
        assert httpx.get(f"{base_url}/health").status_code == 200


def test_a_server_shutting_down_answers_503():
    with app_server(config()) as (base_url, app):
        app.state.server.shutting_down = True
        response = generate(base_url, SHORT)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert httpx.get(f"{base_url}/ready").status_code == 503
        app.state.server.shutting_down = False
        assert generate(base_url, SHORT).status_code == 200


def test_sigterm_finishes_the_request_in_flight_and_exits_0(pool):
    with serve_process("digits", "--max-steps", "200", "--grace-period", "60") as (base_url, process):
        running = pool.submit(generate, base_url, {**LONG, "steps": 30})
        wait_running(base_url)
        process.send_signal(signal.SIGTERM)
        response = running.result(timeout=60)
        assert response.status_code == 200 and len(response.json()["data"]) == 1
        assert process.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base_url}/health")


def test_cors_answers_only_the_configured_origins():
    with app_server(config(cors_origins=["https://app.example.com"])) as (base_url, _):
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(f"{base_url}/v1/images/generations",
                                 headers={"Origin": origin, "Access-Control-Request-Method": "POST"})

        assert preflight("https://app.example.com").headers["access-control-allow-origin"] == \
            "https://app.example.com"
        assert "access-control-allow-origin" not in preflight("https://evil.example.com").headers
