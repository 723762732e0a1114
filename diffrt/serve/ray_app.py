"""The same service on Ray Serve, for more than one machine: one deployment per package (`PackageReplica`, with
replicas or autoscaling, each replica batching its own requests with the single-process worker), and an ingress
deployment serving the same FastAPI app, whose backend sends each request to its package's deployment.

Three ways in: `diffrt serve --ray PACKAGE ...`; `serve run diffrt.serve.ray_app:app_builder packages=digits
replicas=2` (Ray's CLI, or a Serve config file naming `import_path: diffrt.serve.ray_app:app_builder`); or
`build_app(config, ...)` from Python. docs/serving.md shows a multi-node cluster and one GPU replica per device.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from diffrt.serve.backend import merge_progress
from diffrt.serve.batching import PackageWorker
from diffrt.serve.config import ServeConfig
from diffrt.serve.jobs import GenerationRequest, GenerationResult
from diffrt.serve.metrics import Metrics
from diffrt.serve.packages import adapted_pipelines, open_packages
from diffrt.serve.runner import PipelineSet

logger = logging.getLogger(__name__)
APP_NAME = "diffrt"


class PackageReplica:
    """One replica of one package: its pipeline (warmed up) and a batching worker on the replica's event loop."""

    def __init__(self, config: ServeConfig, source: str) -> None:
        self.config = config
        self.info = next(iter(open_packages(dataclasses.replace(config, packages=[source])).values()))
        if config.warmup:
            self.info.pipe.warmup(prompt="", height=self.info.default_size, width=self.info.default_size)
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}-pid{os.getpid()}"
        self.worker: PackageWorker | None = None

    def _worker(self) -> PackageWorker:
        if self.worker is None:  # created on the replica's event loop, on first use
            metrics = Metrics()
            self.worker = PackageWorker(
                self.info.name, PipelineSet(self.info.pipe, self.info.name, self.config.prompt_weighting), metrics,
                max_batch=min(self.config.max_batch, self.info.max_rows),
                batch_wait_s=self.config.batch_wait_ms / 1000, max_queue=self.config.max_queue, replica=self.replica,
                adapted=adapted_pipelines(self.config, self.info, metrics))
            self.worker.start()
        return self.worker

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        job = self._worker().submit(request)
        try:
            return await job.future
        except asyncio.CancelledError:  # the ingress cancelled: timeout or the client went away
            job.cancel()
            raise

    async def interrupt(self) -> bool:
        return self._worker().interrupt()

    async def progress(self) -> dict[str, Any]:
        return self._worker().progress()


class RayBackend:
    """The app's backend in the ingress: each request goes to its package's deployment (Ray picks the replica).
    `interrupt` and `progress` reach one replica of each package, as A1111 has one job at a time."""

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self.handles = handles

    async def start_backend(self) -> None:
        return None

    async def stop_backend(self) -> None:
        return None

    def ready(self) -> bool:
        return True  # serve.run returns once every deployment's replicas are up

    def start(self, request: GenerationRequest) -> tuple[Awaitable[GenerationResult], Callable[[], None]]:
        response = self.handles[request.package].generate.remote(request)

        async def result() -> GenerationResult:
            return await response

        return result(), response.cancel

    async def interrupt(self) -> int:
        return sum([bool(await handle.interrupt.remote()) for handle in self.handles.values()])

    async def progress(self) -> dict[str, Any]:
        return merge_progress([await handle.progress.remote() for handle in self.handles.values()])


@serve.ingress()
class Ingress:
    """The HTTP entry: `create_app` with a `RayBackend`, built on the replica."""

    def __init__(self, config: ServeConfig, handles: dict[str, DeploymentHandle]) -> None:
        self.config = config
        self.handles = handles

    def __serve_build_asgi_app__(self) -> Any:
        from diffrt.serve.app import create_app

        return create_app(dataclasses.replace(self.config, warmup=False), backend=RayBackend(self.handles))


def build_app(config: ServeConfig, replicas: int = 1, autoscaling: dict[str, Any] | None = None,
              ray_actor_options: dict[str, Any] | None = None) -> Any:
    """The Ray Serve application: a `PackageReplica` deployment per package (`replicas` each, or Ray's
    `autoscaling_config`), `ray_actor_options` per replica (e.g. {"num_gpus": 1}: one GPU each), and the ingress."""
    from diffrt.runtime.generation import model_name

    handles = {}
    for source in config.packages:
        name = model_name(source)
        options: dict[str, Any] = {"name": f"diffrt-{name}", "ray_actor_options": ray_actor_options or {},
                                   "max_ongoing_requests": config.max_queue + config.max_batch}
        if autoscaling:
            options["autoscaling_config"] = autoscaling
        else:
            options["num_replicas"] = replicas
        replica: Any = serve.deployment(PackageReplica)  # Any: Ray's overloads type this as a decorator
        handles[name] = replica.options(**options).bind(config, source)
    ingress: Any = serve.deployment(Ingress)
    return ingress.options(name="diffrt-ingress").bind(config, handles)


def _flag(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


# ServeConfig fields `app_builder` takes, with how to read each from Ray's string arguments
CONVERTERS: dict[str, Callable[[str], Any]] = {
    "provider": str, "threads": int, "api_key": str, "max_batch": int, "batch_wait_ms": float, "max_queue": int,
    "max_pixels": int, "max_steps": int, "max_images": int, "max_prompt_chars": int, "max_upload_bytes": int,
    "timeout": float, "output_dir": Path, "warmup": _flag, "grace_period": float, "shared_weights": _flag,
    "deep_cache": int, "deep_cache_schedule": str,
    "cors_origins": lambda text: [origin for origin in text.split(",") if origin],
}


def app_builder(args: dict[str, str]) -> Any:
    """For `serve run diffrt.serve.ray_app:app_builder packages=digits,/models/sd15 replicas=2 num_gpus=1 ...`:
    `packages` (comma-separated), `replicas`, `num_gpus`, `num_cpus`, `min_replicas` + `max_replicas`
    (autoscaling), and any ServeConfig field by name (`max_batch=16`, `api_key=...`, `provider=cuda`)."""
    args = dict(args)
    packages = [p for p in args.pop("packages", "digits").split(",") if p]
    replicas = int(args.pop("replicas", "1"))
    actor: dict[str, Any] = {key: float(args.pop(key)) for key in ("num_gpus", "num_cpus") if key in args}
    low, high = args.pop("min_replicas", None), args.pop("max_replicas", None)
    autoscaling = {"min_replicas": int(low or 1), "max_replicas": int(high)} if high else None
    unknown = sorted(set(args) - set(CONVERTERS))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: packages, replicas, num_gpus, num_cpus, "
                         f"min_replicas, max_replicas, {', '.join(sorted(CONVERTERS))}")
    values: dict[str, Any] = {key: CONVERTERS[key](value) for key, value in args.items()}
    return build_app(ServeConfig(packages=packages, **values), replicas, autoscaling, actor or None)


def run_ray(config: ServeConfig, host: str, port: int, replicas: int) -> int:
    """`diffrt serve --ray`: join the running Ray cluster (RAY_ADDRESS, or a local one started here), serve until
    SIGTERM / Ctrl-C, then shut the application down and exit 0."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config, replicas), name=APP_NAME, route_prefix="/")
    logger.info("Ray Serve application %r on http://%s:%d", APP_NAME, host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0
