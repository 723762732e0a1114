#!/usr/bin/env python3
"""Memory per added session when one process opens a package several times (docs/benchmarks.md, "Sharing weights
between sessions"): what `diffrt serve` does for its LoRA variants, or a program calling `from_pretrained` twice.

    python scripts/sharing_probe.py PACKAGE [--component unet] [--pipelines 3] [--lora]
                                    [--config NAME:KEY=VALUE,KEY=VALUE ...] [--runs 1] [--time 3] [--json out.json]

Each `--config` (engine options; `base:` = none) runs in a fresh child process that opens `--pipelines` pipelines of
PACKAGE (`DiffusionPipeline.from_pretrained`), the first plain and, with `--lora`, each further one with its own
random-weight LoRA (`diffrt.bench.random_lora`, SD 1.5 style: every attention projection, feed-forward and
proj_in / proj_out), and creates each pipeline's `--component` engine: a reading after each, then after `--runs` runs
of each engine on the feeds of one 512x512 CFG call. Readings: `/proc/self/status` VmRSS, RssAnon, RssFile and
`/proc/self/smaps_rollup` Pss, in MiB. RSS counts a file page once per mapping of it; Pss counts it once, however
many sessions map it (ONNX Runtime memory-maps external weights itself), so Pss is the memory actually used.
`--time N`: one more child holding one engine per config (plain weights), N interleaved runs each; the step times
and each output's largest difference from the first config's. Linux only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing
from memory_probe import component_feeds, parse_options  # noqa: E402  (this folder: the feeds of one CFG call)


def readings_mib() -> dict[str, float]:
    values = {}
    for path, keys in (("/proc/self/status", ("VmRSS", "RssAnon", "RssFile")), ("/proc/self/smaps_rollup", ("Pss",))):
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = round(int(rest.split()[0]) / 1024, 1)
    return values


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME:KEY=VALUE,KEY=VALUE` -> (NAME, options); `NAME:` or `NAME` alone: no options."""
    name, _, pairs = text.partition(":")
    return name, parse_options([pair for pair in pairs.split(",") if pair])


def open_engines(args: argparse.Namespace, options: dict[str, Any], loras: list[Path]) -> dict[str, Any]:
    """In this process: `--pipelines` pipelines, each one's engine created, with a reading after each."""
    from diffrt.runtime.pipelines.base import DiffusionPipeline

    readings: list[dict[str, Any]] = [{"stage": "start", **readings_mib()}]
    pipes, engines = [], []
    for index in range(args.pipelines):
        pipe = DiffusionPipeline.from_pretrained(args.package, provider=args.provider, **options)
        if index and loras:
            pipe.load_lora_weights(loras[index - 1], adapter_name=f"random_{index}")
        begin = time.perf_counter()
        engines.append(pipe.engine(args.component))
        pipes.append(pipe)
        what = f"lora {index}" if index and loras else "plain"
        readings.append({"stage": f"pipeline {index + 1} ({what})", "seconds": round(time.perf_counter() - begin, 2),
                         **readings_mib()})
    feeds = component_feeds(engines[0].inputs, args.height, args.width, args.component)
    for run in range(args.runs):
        for index, engine in enumerate(engines):
            begin = time.perf_counter()
            engine.run(feeds, release_memory=True)
            readings.append({"stage": f"run {run + 1} of engine {index + 1}",
                             "seconds": round(time.perf_counter() - begin, 2), **readings_mib()})
    return {"readings": readings}


def time_engines(args: argparse.Namespace, configs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """In this process: one plain engine per config, `--time` interleaved runs each (the first run of each is a
    warm-up and not counted), and each output's largest difference from the first config's."""
    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.engines import create_engine

    component = ModelPackage.open(args.package).component(args.component)
    engines = {name: create_engine(component, args.provider, **options) for name, options in configs}
    feeds = component_feeds(next(iter(engines.values())).inputs, args.height, args.width, args.component)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(args.time + 1):
        for name, engine in engines.items():
            begin, begin_cpu = time.perf_counter(), time.process_time()
            outputs[name] = next(iter(engine.run(feeds).values()))
            seconds[name].append(time.perf_counter() - begin)
            cpu[name].append(time.process_time() - begin_cpu)
    first = outputs[configs[0][0]]
    # CPU seconds (all threads of this process) move less than wall time when other jobs share the cores.
    return {name: {"seconds": [round(s, 2) for s in seconds[name][1:]],
                   "median": round(statistics.median(seconds[name][1:]), 2),
                   "cpu_median": round(statistics.median(cpu[name][1:]), 2),
                   "max_abs_diff": float(np.abs(outputs[name] - first).max())} for name in engines}


def child(args: argparse.Namespace) -> dict[str, Any]:
    configs = [parse_config(text) for text in args.config]
    if args.child == "time":
        return time_engines(args, configs)
    return open_engines(args, configs[0][1], [Path(p) for p in args.lora_files])


def run_child(args: argparse.Namespace, mode: str, configs: list[str], loras: list[Path]) -> dict[str, Any]:
    command = [sys.executable, __file__, args.package, "--child", mode, "--provider", args.provider,
               "--component", args.component, "--pipelines", str(args.pipelines), "--runs", str(args.runs),
               "--time", str(args.time), "--height", str(args.height), "--width", str(args.width)]
    command += [f"--config={text}" for text in configs] + [f"--lora-file={path}" for path in loras]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(done.returncode)
    return json.loads(done.stdout.splitlines()[-1])


def report(name: str, readings: list[dict[str, Any]]) -> None:
    previous = readings[0]
    for reading in readings:
        seconds = f"{reading['seconds']:6.2f} s" if "seconds" in reading else " " * 8
        growth = {key: reading[key] - previous[key] for key in ("VmRSS", "RssAnon", "Pss")}
        print(f"{name:12s} {reading['stage']:24s} {seconds}  VmRSS {reading['VmRSS']:8.0f} (+{growth['VmRSS']:6.0f})  "
              f"RssAnon {reading['RssAnon']:8.0f} (+{growth['RssAnon']:6.0f})  RssFile {reading['RssFile']:7.0f}  "
              f"Pss {reading['Pss']:8.0f} (+{growth['Pss']:6.0f}) MiB", flush=True)
        previous = reading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sharing_probe.py", description=__doc__.splitlines()[0])
    parser.add_argument("package", help="a model package folder")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--component", default="unet")
    parser.add_argument("--pipelines", type=int, default=3, help="pipelines opened in one process")
    parser.add_argument("--lora", action="store_true", help="each pipeline after the first gets its own random LoRA")
    parser.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="engine options of one configuration (repeat; default: shared:, unshared:"
                             "share_weights=false)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each engine after they are all open")
    parser.add_argument("--time", type=int, default=0, help="interleaved timed runs per config (0: no timing)")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=("open", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--lora-file", dest="lora_files", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    configs = args.config or ["shared:", "unshared:share_weights=false"]
    results: dict[str, Any] = {"package": args.package, "component": args.component, "configs": configs}
    with tempfile.TemporaryDirectory() as folder:
        loras: list[Path] = []
        if args.lora:
            from diffrt.bench.random_lora import write_random_lora

            loras = [write_random_lora(args.package, Path(folder) / f"random_{i}.safetensors", seed=i)
                     for i in range(1, args.pipelines)]
        for text in configs:
            name = parse_config(text)[0]
            results[name] = run_child(args, "open", [text], loras)
            report(name, results[name]["readings"])
    if args.time:
        results["time"] = run_child(args, "time", configs, [])
        for name, timing in results["time"].items():
            print(f"{name:12s} {args.component} run {timing['median']:.2f} s median of {timing['seconds']} "
                  f"({timing['cpu_median']:.2f} CPU s), max |diff| from {parse_config(configs[0])[0]}: "
                  f"{timing['max_abs_diff']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
