"""LoRA switch time and UNet step time before / after, on an SD 1.5-sized package (docs/benchmarks.md).

    python scripts/benchmark_lora.py [--preset-dir ~/.cache/diffrt/presets/sd15-<hash>] [--rank 32] [--runs 3]
                                     [--disabled-optimizers NchwcTransformer]

Works on a copy of the preset's package (symlinks to its ONNX files, so nothing of the shared preset changes).
A preset exported before the parameter map existed gets the map derived from its checkpoint
(`diffrt.export.add_parameter_maps`, exact, no re-export), timed separately. The LoRA is SD 1.5-sized: kohya keys on
every attention projection, feed-forward and proj_in / proj_out of the UNet and q/k/v/out/fc1/fc2 of the text encoder,
random low-rank matrices of `--rank`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffrt.bench.random_lora import SD15_STYLE, write_random_lora
from diffrt.bench.report import machine_info
from diffrt.package.names import MANIFEST_NAME, MODEL_FILE


def copy_package(package: Path, work: Path) -> Path:
    """The package with its model files linked, its JSON files copied (the manifest is what changes)."""
    target = work / "package"
    for path in package.rglob("*"):
        out = target / path.relative_to(package)
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".json" or path.name.endswith(".txt"):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.symlink_to(path.resolve())
    return target


def unet_feeds(pipe, size: int) -> dict[str, np.ndarray]:
    """One UNet step's inputs at `size` px, batch 2 (classifier-free guidance), one 77-token chunk."""
    rng = np.random.default_rng(0)
    latent = size // pipe.vae_scale_factor
    return {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
            "timestep": np.full((2,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 768), dtype=np.float32)}


def step_median(pipe, feeds: dict, runs: int) -> float:
    """Median seconds of the UNet engine's run on `feeds` (after one warm-up run)."""
    engine = pipe.engine("unet")
    engine.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    presets = sorted((Path.home() / ".cache" / "diffrt" / "presets").glob("sd15-*"))
    parser.add_argument("--preset-dir", type=Path, default=presets[0] if presets else None)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--disabled-optimizers", default="",
                        help="comma-separated ONNX Runtime transformers every session skips (NchwcTransformer)")
    args = parser.parse_args()
    from diffrt.runtime import DiffusionPipeline

    info = machine_info()
    print(f"load average before: {info['load_average']}")
    print(f"CPU: {info['cpu']}  flags: {' '.join(info['cpu_flags'])}  usable cpus: {info['usable_cpus']}  "
          f"load average: {info['load_average']}")
    work = Path(tempfile.mkdtemp(prefix="diffrt-lora-bench-"))
    result: dict = {"machine": {k: info[k] for k in ("cpu", "cpu_flags", "usable_cpus", "load_average")}}
    try:
        package = copy_package(args.preset_dir / "package-fp32-onnxruntime", work)
        manifest = json.loads((package / MANIFEST_NAME).read_text())
        if "parameters" not in manifest["components"]["unet"]:
            # in a child process: its torch UNet must not stay in this process's memory while sessions run
            start = time.perf_counter()
            code = "import sys; from diffrt.export import add_parameter_maps; add_parameter_maps(*sys.argv[1:])"
            subprocess.run([sys.executable, "-c", code, str(args.preset_dir / "checkpoint"), str(package)],
                           check=True)
            result["derive_map_seconds"] = time.perf_counter() - start
        lora = write_random_lora(package, work / "lora.safetensors", rank=args.rank, layout=SD15_STYLE)
        result["lora"] = {"rank": args.rank, "bytes": lora.stat().st_size}
        disabled = [name for name in args.disabled_optimizers.split(",") if name]
        result["disabled_optimizers"] = disabled
        pipe = DiffusionPipeline.from_pretrained(package, load="eager",
                                                 **({"disabled_optimizers": disabled} if disabled else {}))
        result["unet_file"] = str((args.preset_dir / "package-fp32-onnxruntime" / "unet" / MODEL_FILE))
        feeds = unet_feeds(pipe, args.size)
        # Sequential, one UNet session at a time (two SD 1.5 sessions and the deltas do not fit beside the other
        # engineers' jobs on the 23 GB dev machine); the load average is printed with the result.
        result["unet_step_seconds"] = {"size": args.size, "batch": 2, "runs": args.runs}
        result["unet_step_seconds"]["without_lora"] = step_median(pipe, feeds, args.runs)
        start = time.perf_counter()
        pipe.load_lora_weights(lora, adapter_name="a")
        result["load_lora_seconds"] = time.perf_counter() - start  # read + deltas + UNet and text encoder sessions
        start = time.perf_counter()
        dict(pipe.adapters.overrides("unet"))  # the values are computed when read
        result["unet_deltas_seconds"] = time.perf_counter() - start  # the NumPy part of it, UNet only
        start = time.perf_counter()
        pipe.set_adapters("a", adapter_weights=0.5)
        result["switch_weight_seconds"] = time.perf_counter() - start
        result["unet_step_seconds"]["with_lora"] = step_median(pipe, feeds, args.runs)
        start = time.perf_counter()
        pipe.unload_lora_weights()
        result["unload_seconds"] = time.perf_counter() - start
        result["unet_step_seconds"]["after_unload"] = step_median(pipe, feeds, args.runs)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_average_after"] = list(os.getloadavg())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
