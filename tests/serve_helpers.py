"""Real servers for the serve tests: `diffrt serve`'s app on uvicorn in a thread of this process (`app_server`), or
the real `diffrt serve` command as a process (`serve_process`), each on a free port of 127.0.0.1."""
from __future__ import annotations

import base64
import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
from cli_runner import cli_env
from PIL import Image

READY_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, timeout: float = READY_TIMEOUT, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            errors = process.stderr.read() if process.stderr else ""
            raise RuntimeError(f"the server exited with {process.returncode}: {errors}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} was not ready within {timeout} s")


@contextlib.contextmanager
def app_server(config) -> Iterator[tuple[str, object]]:
    """(base URL, the app) of `create_app(config)` served by uvicorn on 127.0.0.1 in a background thread."""
    import uvicorn

    from diffrt.serve.app import create_app

    app = create_app(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url)
        yield base_url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def serve_process(*args: str, cwd: Path | None = None, **env: str | None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of the real `diffrt serve ARGS --port FREE`; killed at the end if still running."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "diffrt.cli", "serve", *args, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(**env), cwd=cwd)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process=process)
        yield base_url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def b64_pixels(text: str) -> np.ndarray:
    return png_pixels(base64.b64decode(text))


def png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        return dict(image.text)


def wait_until(condition, timeout: float = 30.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def metric(base_url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent), read from the real /metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", headers=headers or {}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
