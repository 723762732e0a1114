#!/usr/bin/env python3
"""Resident memory of a package's engines: after load, after the first run, and at peak (docs/benchmarks.md).

    python scripts/memory_probe.py PACKAGE [--provider openvino] [--option inference_precision=bf16 ...]
                                   [--target unet,text_encoder,vae_decoder,pipeline] [--height 512 --width 512]
                                   [--steps 2] [--runs 2] [--json out.json]

Each target runs in its own fresh process, so one target's memory never shows in another's numbers:
- a component (`text_encoder`, `unet`, `vae_decoder`, ...): `create_engine(component, provider, **options)`, its
  specs read (what a pipeline's load does), then `--runs` runs on the feeds of one CFG text-to-image call at
  `--height` x `--width` (batch 2; the VAE decoder batch 1);
- `pipeline`: `DiffusionPipeline.from_pretrained` + `load_engines`, one reading after each engine is created, then
  `--runs` images of `--steps` steps.
Readings are `/proc/self/status` VmRSS (now; RssAnon: heap, RssFile: mapped files) and VmHWM (peak so far), in MiB.
Generic over providers: `--provider cpu` measures ONNX Runtime the same way. `--option key=value` passes engine
options (values parsed as JSON where they parse: `static_shapes=true`, `threads=2`; else strings). Linux only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Run from a source checkout without installing: the repository root holds the `diffrt` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ("text_encoder", "unet", "vae_decoder", "pipeline")
LATENT = 8  # the VAE's downscale factor of the SD family


def status_mib() -> dict[str, float]:
    """VmRSS (now), VmHWM (peak), and of the RSS now: RssAnon (heap) and RssFile (mapped files), in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)
    return {"rss_mib": values["VmRSS"], "peak_mib": values["VmHWM"], "anon_mib": values["RssAnon"],
            "file_mib": values["RssFile"]}


def component_feeds(specs: list[Any], height: int, width: int, name: str) -> dict[str, np.ndarray]:
    """Feeds for one CFG call at this image size: named dims from the SD family's conventions."""
    batch = 1 if name.startswith("vae") else 2
    dims = {"batch": batch, "height": height // LATENT, "width": width // LATENT, "sequence": 77,
            "latent_height": height // LATENT, "latent_width": width // LATENT}
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        if np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 1000, shape).astype(spec.dtype)
        elif spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500, spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


def probe(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """In this process: the readings of one target."""
    readings: list[dict[str, Any]] = [{"stage": "start", **status_mib()}]

    def read(stage: str, seconds: float) -> None:
        readings.append({"stage": stage, "seconds": round(seconds, 2), **status_mib()})

    start = time.perf_counter()
    if args.target == "pipeline":
        from diffrt.runtime.pipelines.base import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.package, provider=args.provider, **options)
        for name in pipe.engine_names():
            begin = time.perf_counter()
            pipe.engine(name)
            read(f"load {name}", time.perf_counter() - begin)
        for run in range(args.runs):
            begin = time.perf_counter()
            pipe("a photo of a cat", height=args.height, width=args.width, num_inference_steps=args.steps,
                 generator=0, output_type="np")
            read(f"image {run + 1}", time.perf_counter() - begin)
    else:
        from diffrt.package.reader import ModelPackage
        from diffrt.runtime.engines import create_engine

        engine = create_engine(ModelPackage.open(args.package).component(args.target), args.provider, **options)
        feeds = component_feeds(engine.inputs, args.height, args.width, args.target)
        read("load", time.perf_counter() - start)
        for run in range(args.runs):
            begin = time.perf_counter()
            engine.run(feeds)
            read(f"run {run + 1}", time.perf_counter() - begin)
    return {"target": args.target, "provider": args.provider, "options": options, "readings": readings}


def parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option takes key=value; got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memory_probe.py", description=__doc__.splitlines()[0])
    parser.add_argument("package", help="a model package folder")
    parser.add_argument("--provider", default="openvino")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="an engine option")
    parser.add_argument("--target", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per image (target pipeline)")
    parser.add_argument("--runs", type=int, default=2, help="runs (images) after load")
    parser.add_argument("--json", help="write the readings here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = parse_options(args.option)
    if args.child:
        print(json.dumps(probe(args, options)))
        return 0
    results = []
    for target in [t.strip() for t in args.target.split(",") if t.strip()]:
        command = [sys.executable, __file__, "--child", args.package, "--provider", args.provider,
                   "--target", target, "--height", str(args.height), "--width", str(args.width),
                   "--steps", str(args.steps), "--runs", str(args.runs)]
        command += [f"--option={pair}" for pair in args.option]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return done.returncode
        result = json.loads(done.stdout.splitlines()[-1])
        results.append(result)
        for reading in result["readings"]:
            seconds = f"{reading['seconds']:8.2f} s" if "seconds" in reading else " " * 10
            print(f"{target:14s} {reading['stage']:20s} {seconds}  rss {reading['rss_mib'] / 1024:6.2f} GiB  "
                  f"peak {reading['peak_mib'] / 1024:6.2f} GiB  (anon {reading['anon_mib'] / 1024:5.2f}, "
                  f"file {reading['file_mib'] / 1024:5.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
