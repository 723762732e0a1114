"""What every route needs: the settings, the packages, the backend, metrics, the output folder, A1111's options;
and `generate`, the one path from a checked request to its result."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

from fastapi import Request

from diffrt.serve.auth import check_key
from diffrt.serve.backend import Backend, await_result
from diffrt.serve.config import ServeConfig
from diffrt.serve.jobs import GenerationRequest, GenerationResult, ServeError
from diffrt.serve.limits import check_request
from diffrt.serve.loras import LoraLibrary, lora_hashes, resolve_loras
from diffrt.serve.metrics import Metrics
from diffrt.serve.outputs import OutputFolder
from diffrt.serve.packages import PackageInfo, find_package


@dataclass
class ServerState:
    config: ServeConfig
    infos: dict[str, PackageInfo]
    backend: Backend
    metrics: Metrics
    outputs: OutputFolder
    #: A1111's `sd_model_checkpoint`: the package `/sdapi/` requests use (POST /sdapi/v1/options changes it)
    current_model: str = ""
    shutting_down: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    #: the LoRAs requests may name (--lora-dir); None: requests with LoRAs are refused
    loras: LoraLibrary | None = None

    def package(self, name: str | None, param: str) -> PackageInfo:
        return find_package(self.infos, name or self.current_model, param)


def server(request: Request) -> ServerState:
    """The route's server state, after the API-key check (a FastAPI dependency)."""
    state: ServerState = request.app.state.server
    check_key(state.config.api_key, request.headers.get("authorization"))
    return state


async def generate(state: ServerState, job: GenerationRequest, names: dict[str, str],
                   http_request: Request) -> GenerationResult:
    """Check `job` against the limits (errors name the API's fields via `names`), queue it, wait for it."""
    if state.shutting_down or not state.backend.ready():
        raise ServeError(503, "the server is not ready (starting or shutting down)", code="not_ready",
                         kind="server_error", headers={"Retry-After": "5"})
    check_request(job, state.infos[job.package], state.config, names)
    work, cancel = state.backend.start(job)
    return await await_result(work, cancel, state.config.timeout, client_gone(http_request))


async def apply_loras(state: ServerState, job: GenerationRequest, prompt: str, explicit: Sequence[Any] | None,
                      explicit_param: str = "loras") -> None:
    """Give `job` the LoRAs of its `prompt`'s `<lora:...>` tags and of `explicit`: the text encoder reads the prompt
    without the tags, the infotext keeps it as sent and gains A1111's `Lora hashes`. ServeError 400 (naming the
    field) for an unknown name, a weight that is not finite, or LoRAs on a server without --lora-dir."""
    found = resolve_loras(state.loras, prompt, explicit, explicit_param)
    if not found.mentioned:
        return
    job.shown_prompts = list(job.prompts)
    job.prompts = [found.prompt] * len(job.prompts)
    job.loras = found.loras
    job.extra_fields = {**job.extra_fields, **await asyncio.to_thread(lora_hashes, state.loras, found.mentioned)}


async def client_gone(request: Request) -> None:
    """Completes when the client disconnects. The body has been read by now, so the next ASGI message can only be
    `http.disconnect` (Starlette's StreamingResponse listens the same way)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
