"""`diffrt serve PACKAGE [PACKAGE ...]`: the HTTP image service (OpenAI Images API + AUTOMATIC1111's API) on
uvicorn, or with `--ray` as a Ray Serve application. SIGTERM (or Ctrl-C) stops accepting connections, lets requests
in flight finish within `--grace-period` seconds, and exits 0. Needs the `serve` extra (`ray` for `--ray`)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from diffrt.cli.args import add_prompt_weighting, int_in, number_in, positive_int, prompt_weighting
from diffrt.errors import InputError

if TYPE_CHECKING:
    from diffrt.serve.config import ServeConfig

logger = logging.getLogger(__name__)
API_KEY_ENV = "DIFFRT_API_KEY"
MEBIBYTE = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffrt.serve.config import DEFAULT_PORT, ServeConfig

    defaults = ServeConfig(packages=[])
    parser.add_argument("packages", nargs="+", metavar="PACKAGE",
                        help="model package folder, Hub repo id or built-in name (digits); each is served under its "
                        "name, the first is the default model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive_int, default=DEFAULT_PORT)
    parser.add_argument("--provider", default="cpu", help="cpu, cuda, tensorrt, openvino, auto or trt (as generate)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads per engine")
    parser.add_argument("--api-key", default=None,
                        help=f"require this key (Authorization: Bearer KEY); default: ${API_KEY_ENV} if set")
    parser.add_argument("--max-batch", type=positive_int, default=defaults.max_batch,
                        help="most images one pipeline call combines (1: no batching)")
    parser.add_argument("--batch-wait-ms", type=number_in(0), default=defaults.batch_wait_ms,
                        help="how long a batch waits for more requests to join it")
    parser.add_argument("--max-queue", type=positive_int, default=defaults.max_queue,
                        help="requests waiting per package before new ones get 429")
    parser.add_argument("--max-pixels", type=positive_int, default=defaults.max_pixels,
                        help="largest width x height of a request")
    parser.add_argument("--max-steps", type=positive_int, default=defaults.max_steps)
    parser.add_argument("--max-images", type=positive_int, default=defaults.max_images,
                        help="most images one request may ask for")
    parser.add_argument("--max-prompt-chars", type=positive_int, default=defaults.max_prompt_chars)
    parser.add_argument("--max-upload-mb", type=number_in(0, open_low=True),
                        default=defaults.max_upload_bytes / MEBIBYTE, help="largest uploaded image")
    parser.add_argument("--timeout", type=number_in(0, open_low=True), default=defaults.timeout,
                        help="seconds a request may take from arrival to answer (504 after)")
    parser.add_argument("--grace-period", type=number_in(0), default=defaults.grace_period,
                        help="seconds SIGTERM waits for requests in flight")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="folder of images answered as URLs (default: a new temporary folder)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="allow browser requests from this origin (repeatable; default: CORS off)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up run of each package")
    parser.add_argument("--lora-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="folder of LoRA files (A1111's models/Lora; repeatable): each *.safetensors below it is "
                        "applied by its file name, with <lora:NAME:WEIGHT> in a prompt or the `loras` field")
    parser.add_argument("--lora-cache", type=int_in(0, 1 << 10), default=defaults.lora_cache, metavar="N",
                        help="LoRA-adapted pipelines kept per package, least recently used evicted (each holds its "
                        "own engines: memory; default %(default)s)")
    parser.add_argument("--shared-weights", action="store_true",
                        help="provider cpu: every pipeline of a package (LoRA variants too) reads one shared copy of "
                        "its weights instead of ONNX Runtime's pre-packed and reordered copies of its own: about 3 GiB "
                        "less per added SD 1.5 pipeline, slower UNet steps (docs/benchmarks.md)")
    parser.add_argument("--deep-cache", type=positive_int, default=None, metavar="N",
                        help="DeepCache for requests that do not set `deep_cache_interval`: the full UNet every N "
                        "steps, the shallow UNet between (every package exported with --deep-cache; 1: off)")
    parser.add_argument("--deep-cache-schedule", choices=("uniform", "nonuniform"),
                        default=defaults.deep_cache_schedule,
                        help="which steps of a DeepCache request run the full UNet: uniform (0, N, 2N, ...; default) "
                        "or nonuniform (as many, densest at the start: closer to the full UNet's image)")
    add_prompt_weighting(parser)
    parser.add_argument("--ray", action="store_true", help="run as a Ray Serve application (a running cluster, or "
                        "a local one); one deployment per package")
    parser.add_argument("--replicas", type=positive_int, default=1, help="with --ray: replicas per package")


def config_from(args: argparse.Namespace) -> ServeConfig:
    from diffrt.serve.config import ServeConfig

    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        raise InputError(f"`--output-dir` {os.fsdecode(args.output_dir)!r} is not a folder")
    if args.shared_weights:
        from diffrt.runtime.engines import shared_weight_options

        shared_weight_options(args.provider, "--shared-weights")  # refused before any package is opened
    for folder in args.lora_dir:
        if not folder.is_dir():
            raise InputError(f"`--lora-dir` {os.fsdecode(folder)!r} is not a folder (expected A1111's models/Lora: "
                             "a folder of .safetensors files)")
    return ServeConfig(
        packages=list(args.packages), provider=args.provider, threads=args.threads,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_pixels=args.max_pixels,
        max_steps=args.max_steps, max_images=args.max_images, max_prompt_chars=args.max_prompt_chars,
        max_upload_bytes=int(args.max_upload_mb * MEBIBYTE), timeout=args.timeout, output_dir=args.output_dir,
        cors_origins=list(args.cors_origin), warmup=not args.no_warmup, grace_period=args.grace_period,
        prompt_weighting=prompt_weighting(args), lora_dirs=list(args.lora_dir), lora_cache=args.lora_cache,
        shared_weights=args.shared_weights, deep_cache=args.deep_cache, deep_cache_schedule=args.deep_cache_schedule)


def _graceful_server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again, so the process ends
        killed by it (exit -15). A service manager reads that as a crash; after a clean shutdown we exit 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return GracefulServer


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    if args.ray:
        from diffrt.serve.ray_app import run_ray

        return run_ray(config, host=args.host, port=args.port, replicas=args.replicas)
    import uvicorn

    from diffrt.serve.app import create_app

    GracefulServer = _graceful_server_class()

    app = create_app(config)
    server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=math.ceil(config.grace_period)))
    server.run()
    return 0 if server.started else 1
