"""`diffrt bench` orchestration: resolve the package, start one worker process per side, interleave their runs.

Each side (diffrt, and each `--compare` library) runs in its own process (`diffrt.bench.worker`), so the diffrt
side stays torch-free and no side shares an allocator or thread pool with another. Sides load one after the other
(their cold starts are not disturbed by each other); measured runs are then interleaved A B, B A, A B, ... so
machine drift falls on both sides alike. The first image of each side is its cold start and counts as its first
warm-up run; with `--warmup 0` it is the first measured run instead.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from diffrt.bench.presets import PRESETS, ensure_package, is_preset, load_preset
from diffrt.bench.worker import RunConfig
from diffrt.errors import EngineError, InputError, PackageError, invalid

__all__ = ["BenchOptions", "run_benchmark", "COMPARE_SIDES"]

logger = logging.getLogger(__name__)

COMPARE_SIDES = ("diffusers", "optimum")
NEEDED = ("unet", "vae_decoder")


@dataclass(frozen=True)
class BenchOptions:
    target: str
    provider: str = "cpu"
    steps: int = 20
    height: int | None = None
    width: int | None = None
    batch: int = 1
    guidance: float = 7.5
    scheduler: str | None = None
    warmup: int = 1
    runs: int = 3
    compare: tuple[str, ...] = ()
    threads: int | None = None
    seed: int = 0
    checkpoint: str | None = None


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(name, f"an integer >= {minimum}", value)


def check_options(opts: BenchOptions) -> None:
    """Every argument checked before anything is built or loaded."""
    if not is_preset(opts.target) and not Path(opts.target).is_dir():
        raise invalid("package", f"a model package folder or a preset ({', '.join(PRESETS)})", opts.target)
    for name in ("steps", "batch", "runs", "warmup", "threads"):
        value = getattr(opts, name)
        if value is not None:
            _positive_int(name, value, 0 if name == "warmup" else 1)
    for name in ("height", "width"):
        value = getattr(opts, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
            raise invalid(name, "a multiple of 8, at least 8", value)
    if not 0.0 <= opts.guidance <= 100.0:
        raise invalid("guidance", "a number in [0, 100]", opts.guidance)
    unknown = [side for side in opts.compare if side not in COMPARE_SIDES]
    if unknown:
        raise invalid("compare", f"a comma-separated list of {', '.join(COMPARE_SIDES)}", unknown[0])
    if opts.scheduler is not None:
        from diffrt.schedulers import registered_names

        if opts.scheduler not in registered_names():
            raise invalid("scheduler", f"a Diffusers scheduler class name ({', '.join(registered_names())})",
                          opts.scheduler)
    from diffrt.runtime.pipelines.base import check_provider

    check_provider(opts.provider)


def _source_checkpoint(package: Path) -> str | None:
    """The local checkpoint folder the package was exported from, if the manifest names one that still exists."""
    try:
        manifest = json.loads((package / "diffrt.json").read_text())
    except (OSError, ValueError):
        return None
    source = manifest.get("source") or {}
    for key in ("path", "id"):
        value = source.get(key) if isinstance(source, dict) else None
        if isinstance(value, str) and (Path(value) / "model_index.json").exists():
            return value
    return None


def resolve(opts: BenchOptions) -> tuple[Path, str | None, int]:
    """(package folder, source checkpoint or None, default image size); builds a preset on first use."""
    if is_preset(opts.target):
        preset = load_preset(opts.target)
        precision = "fp16" if opts.provider.lower() not in ("cpu", "cpuexecutionprovider") else "fp32"
        package = ensure_package(opts.target, precision=precision)
        return package, opts.checkpoint or str(preset.checkpoint), preset.default_size
    from diffrt.runtime.package import ModelPackage

    package = Path(opts.target)
    try:
        opened = ModelPackage.open(package)
    except Exception as error:
        raise PackageError(f"`package` {str(package)!r} is not a model package: {error}") from error
    missing = [name for name in NEEDED if not opened.has(name)]
    if not (opened.has("text_encoder") or opened.has("text_encoder_2")):
        missing.append("text_encoder")
    if missing:
        raise PackageError(f"`package` {str(package)!r} has no {', '.join(missing)} component, needed to benchmark "
                           "text-to-image; export it with those components")
    sample = opened.unet_config.get("sample_size", 64)
    size = (sample[0] if isinstance(sample, (list, tuple)) else sample) * 8
    return package, opts.checkpoint or _source_checkpoint(package), int(size)


class Worker:
    """One side's process; `request()` runs one image there and returns its sample."""

    def __init__(self, side: str, config: RunConfig):
        self.side = side
        env = dict(os.environ, OMP_NUM_THREADS=str(config.threads), TOKENIZERS_PARALLELISM="false")
        command = [sys.executable, "-m", "diffrt.bench.worker", side, config.to_json()]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise EngineError(f"the {self.side} benchmark process exited with status {code} (see its log above)")
        message = json.loads(line)
        if message.get("event") == "error":
            self.close()
            cls = InputError if message["type"] in ("InputError", "PackageError", "ConfigError") else EngineError
            raise cls(f"{self.side} side: {message['message']}")
        return message

    def request(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"cmd": "run"}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
            except OSError:
                pass
        self.process.wait()


def run_config(opts: BenchOptions, package: Path, checkpoint: str | None, size: int) -> RunConfig:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = opts.threads or available
    return RunConfig(package=str(package), checkpoint=checkpoint, provider=opts.provider, steps=opts.steps,
                     height=opts.height or size, width=opts.width or size, batch=opts.batch,
                     guidance=opts.guidance, scheduler=opts.scheduler, threads=int(threads or 1), seed=opts.seed)


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark and return its full record (see `diffrt.bench.report.build_record`)."""
    from diffrt.bench.report import build_record

    check_options(opts)
    package, checkpoint, size = resolve(opts)
    config = run_config(opts, package, checkpoint, size)
    sides = ("diffrt",) + tuple(opts.compare)
    raw = {side: {"warmup": [], "samples": []} for side in sides}
    workers: dict[str, Worker] = {}
    try:
        for side in sides:
            logger.info("%s: loading and making the first image (cold start)", side)
            workers[side] = Worker(side, config)
            ready = workers[side].read()
            raw[side].update(info=ready["info"], cold_start=ready["cold_start"])
            first = dict(ready["first"], round=0)
            raw[side]["warmup" if opts.warmup else "samples"].append(first)
        _interleave(workers, raw, sides, max(opts.warmup - 1, 0), opts.runs - (0 if opts.warmup else 1))
    finally:
        for worker in workers.values():
            worker.close()
    return build_record(opts, config, raw, load_preset(opts.target).name if is_preset(opts.target) else None)


def _interleave(workers: dict[str, Worker], raw: dict[str, Any], sides: Sequence[str], warmup: int,
                runs: int) -> None:
    for round_ in range(1, warmup + runs + 1):
        order = list(sides) if round_ % 2 else list(reversed(sides))
        for side in order:
            start = time.perf_counter()
            sample = dict(workers[side].request(), round=round_)
            sample.pop("event", None)
            raw[side]["warmup" if round_ <= warmup else "samples"].append(sample)
            logger.info("%s: %s %d done in %.2f s", side, "warm-up" if round_ <= warmup else "run",
                        round_ if round_ <= warmup else round_ - warmup, time.perf_counter() - start)

