"""Where a request's images are made: `LocalBackend` (a worker per package in this process) or, with Ray Serve,
`ray_app.RayBackend`. Both give `start(request) -> (awaitable, cancel)`; `await_result` adds the timeout and the
watch for a client that went away, the same for both."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Protocol

from diffrt.serve.batching import PackageWorker
from diffrt.serve.config import ServeConfig
from diffrt.serve.jobs import GenerationRequest, GenerationResult, ServeError
from diffrt.serve.metrics import Metrics
from diffrt.serve.packages import PackageInfo, adapted_pipelines
from diffrt.serve.runner import PipelineSet

logger = logging.getLogger(__name__)


class Backend(Protocol):
    async def start_backend(self) -> None: ...
    async def stop_backend(self) -> None: ...
    def ready(self) -> bool: ...
    def start(self, request: GenerationRequest) -> tuple[Awaitable[GenerationResult], Callable[[], None]]: ...
    async def interrupt(self) -> int: ...
    async def progress(self) -> dict[str, Any]: ...


class LocalBackend:
    """One `PackageWorker` per package, all in this process; engines are warmed at start (`/ready` waits for it)."""

    def __init__(self, config: ServeConfig, infos: dict[str, PackageInfo], metrics: Metrics) -> None:
        self.config = config
        self.infos = infos
        self.metrics = metrics
        self.workers: dict[str, PackageWorker] = {}
        self._ready = False

    async def start_backend(self) -> None:
        for name, info in self.infos.items():
            worker = PackageWorker(name, PipelineSet(info.pipe, name, self.config.prompt_weighting), self.metrics,
                                   max_batch=min(self.config.max_batch, info.max_rows),
                                   batch_wait_s=self.config.batch_wait_ms / 1000, max_queue=self.config.max_queue,
                                   replica=f"pid-{os.getpid()}",
                                   adapted=adapted_pipelines(self.config, info, self.metrics))
            worker.start()
            self.workers[name] = worker
        if self.config.warmup:
            await asyncio.get_running_loop().run_in_executor(None, self._warm)
        self._ready = True

    def _warm(self) -> None:
        for name, info in self.infos.items():
            seconds = info.pipe.warmup(prompt="", height=info.default_size, width=info.default_size)
            logger.info("%s warmed up in %.2f s", name, seconds)

    async def stop_backend(self) -> None:
        self._ready = False
        for worker in self.workers.values():
            await worker.stop()

    def ready(self) -> bool:
        return self._ready

    def start(self, request: GenerationRequest) -> tuple[Awaitable[GenerationResult], Callable[[], None]]:
        job = self.workers[request.package].submit(request)
        return job.future, job.cancel

    async def interrupt(self) -> int:
        return sum(worker.interrupt() for worker in self.workers.values())

    async def progress(self) -> dict[str, Any]:
        return merge_progress([worker.progress() for worker in self.workers.values()])


def merge_progress(parts: list[dict[str, Any]]) -> dict[str, Any]:
    running = [p for p in parts if p["running"]]
    current = running[0] if running else {"step": 0, "steps": 0, "interrupted": False, "eta_s": 0.0}
    return {"running": len(running), "queued": sum(p["queued"] for p in parts), "step": current["step"],
            "steps": current["steps"], "interrupted": current["interrupted"], "eta_s": current["eta_s"]}


async def await_result(work: Awaitable[GenerationResult], cancel: Callable[[], None], timeout: float,
                       disconnect: Awaitable[None]) -> GenerationResult:
    """The result; ServeError 504 after `timeout` seconds, 499 when `disconnect` completes (the client went away).
    Both cancel the work: nothing is computed for nobody. Event-driven, no polling: the wait ends on whichever
    comes first."""
    future = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnect)
    try:
        done, _ = await asyncio.wait({future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            if future.cancelled():  # the worker stopped: the server is shutting down
                raise ServeError(503, "the server is shutting down", code="shutting_down", kind="server_error")
            return future.result()
        if watcher in done:
            raise ServeError(499, "the client closed the connection", code="client_closed")
        raise ServeError(504, f"the request took longer than this server's timeout of {timeout:g} s (--timeout)",
                         code="timeout", kind="server_error")
    except BaseException:
        if not future.done():
            cancel()
            future.cancel()
        raise
    finally:
        watcher.cancel()
