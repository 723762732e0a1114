"""`create_app(config)`: the FastAPI application of `diffrt serve` (OpenAI Images API, AUTOMATIC1111's API,
`/health`, `/ready`, `/metrics`). The packages open when the app is made; workers start and engines warm up in the
app's lifespan, and `/ready` says when that is done. Run it with uvicorn (`diffrt serve` does)."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffrt import __version__
from diffrt.serve import a1111_api, http_errors, openai_api
from diffrt.serve.backend import Backend, LocalBackend
from diffrt.serve.config import ServeConfig
from diffrt.serve.jobs import ServeError
from diffrt.serve.loras import LoraLibrary
from diffrt.serve.metrics import Metrics
from diffrt.serve.outputs import OutputFolder
from diffrt.serve.packages import PackageInfo, open_packages
from diffrt.serve.state import ServerState, server

logger = logging.getLogger(__name__)
BODY_OVERHEAD = 1024 * 1024  # form fields and JSON around an upload, on top of its base64 size


def create_app(config: ServeConfig, infos: dict[str, PackageInfo] | None = None,
               backend: Backend | None = None) -> FastAPI:
    """The application; `infos` / `backend` default to this process (the Ray ingress passes its own backend)."""
    loras = _lora_library(config)  # before the packages open: a provider without LoRA support fails at once
    infos = infos if infos is not None else open_packages(config)
    metrics = Metrics()
    state = ServerState(config, infos, backend or LocalBackend(config, infos, metrics), metrics,
                        OutputFolder(config.output_dir), current_model=next(iter(infos)), loras=loras)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.backend.start_backend()
        logger.info("serving %s", ", ".join(infos))
        try:
            yield
        finally:
            state.shutting_down = True
            await state.backend.stop_backend()
            state.outputs.close()

    app = FastAPI(title="diffrt", version=__version__, lifespan=lifespan)
    app.state.server = state
    http_errors.install(app)
    app.add_middleware(RequestMetrics, metrics=metrics,
                       max_body=config.max_upload_bytes * 4 // 3 + BODY_OVERHEAD)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)
    _add_service_routes(app, state)
    return app


def _lora_library(config: ServeConfig) -> LoraLibrary | None:
    """The --lora-dir LoRAs (each package's engines are checked when its adapted pipelines are set up)."""
    if not config.lora_dirs:
        return None
    return LoraLibrary(config.lora_dirs)


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        is_ready = state.backend.ready() and not state.shutting_down
        return JSONResponse({"ready": is_ready, "models": list(state.infos)}, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def metrics(_: Any = Depends(server)) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Counts requests by endpoint (the route's path template) and status, times them, and refuses a body larger
    than `max_body` bytes (413) before reading it. Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's
    disconnect from the route, which cancellation depends on."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        try:
            if int(length) > self.max_body:
                await self._too_large(scope, receive, record)
            else:
                await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        error = ServeError(413, f"the request body is larger than this server's limit of {self.max_body} bytes "
                           "(--max-upload-mb)", param="body", code="request_too_large")
        await http_errors.error_response(request, error)(scope, receive, send)
