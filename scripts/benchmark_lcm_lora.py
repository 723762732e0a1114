"""Seconds per 512x512 image on the sd15 preset, in one run: Diffusers' default pipeline (50 steps, guidance 7.5, the
checkpoint's scheduler) against diffrt with LCM-LoRA, LCMScheduler at 4 steps, guidance 1 and the tiny VAE (TAESD)
(issue #19; docs/benchmarks.md, README).

    python scripts/benchmark_lcm_lora.py [--preset-dir ~/.cache/diffrt/presets/sd15-<hash>] [--rank 64]
                                         [--diffrt-full-steps 25] [--json out.json]

The LCM-LoRA is a random-weight file in latent-consistency/lcm-lora-sdv1-5's layout and rank
(`diffrt.bench.random_lora.LCM_LORA`), the tiny VAE random TAESD weights: the same work per step as the real ones,
not their images. Each side makes one untimed 1-step image first (first-call warm-up), then one timed image; load
times are reported apart. `--diffrt-full-steps N` adds diffrt's own N-step guidance-7.5 image with the full VAE.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from diffrt.bench.presets import ensure_package, ensure_tiny_vae
from diffrt.bench.random_lora import LCM_LORA, write_random_lora
from diffrt.bench.report import machine_info

PROMPT = "a castle on a hill, golden hour"
DIFFUSERS_DEFAULT_STEPS = 50  # StableDiffusionPipeline.__call__'s default


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def diffusers_default(checkpoint: Path, size: int) -> dict[str, float]:
    """Diffusers' StableDiffusionPipeline with its defaults, fp32 on the CPU."""
    import diffusers
    import torch

    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - start

    def image(steps: int) -> None:
        with torch.inference_mode():
            pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0))

    image(1)
    return {"load_seconds": loaded, "seconds": timed(lambda: image(DIFFUSERS_DEFAULT_STEPS))}


def diffrt_lcm_lora(package: Path, size: int, rank: int, vae: str, full_steps: int) -> dict[str, float]:
    from diffrt.runtime import DiffusionPipeline
    from diffrt.schedulers import LCMScheduler

    result: dict[str, float] = {}
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(package, vae=vae, load="eager")
    pipe.set_progress_bar_config(disable=True)
    result["load_seconds"] = time.perf_counter() - start
    if full_steps:
        pipe(PROMPT, num_inference_steps=1, generator=0, height=size, width=size)
        result[f"seconds_{full_steps}_steps_cfg"] = timed(
            lambda: pipe(PROMPT, num_inference_steps=full_steps, generator=0, height=size, width=size))
    with tempfile.TemporaryDirectory(prefix="diffrt-lcm-") as work:
        lora = write_random_lora(package, Path(work) / "lcm-lora.safetensors", rank=rank, layout=LCM_LORA)
        result["load_lcm_lora_seconds"] = timed(lambda: pipe.load_lora_weights(lora))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    def image(steps: int) -> None:
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, generator=0, height=size, width=size)

    image(1)
    result["seconds"] = timed(lambda: image(4))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset-dir", type=Path, default=None,
                        help="the sd15 preset's cache folder (default: built or found in $DIFFRT_CACHE)")
    parser.add_argument("--rank", type=int, default=64)  # lcm-lora-sdv1-5's rank
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--vae", choices=("tiny", "full"), default="tiny", help="diffrt's VAE (default tiny)")
    parser.add_argument("--diffrt-full-steps", type=int, default=0, metavar="N",
                        help="also time diffrt's N-step guidance-7.5 image (full VAE); 0: not")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    package = (args.preset_dir / "package-fp32-onnxruntime" if args.preset_dir is not None
               else ensure_package("sd15"))
    checkpoint = package.parent / "checkpoint"
    if args.vae == "tiny":
        ensure_tiny_vae("sd15", package)
    info = machine_info()
    print(f"CPU: {info['cpu']}  flags: {' '.join(info['cpu_flags'])}  usable cpus: {info['usable_cpus']}  "
          f"load average: {info['load_average']}", flush=True)
    result: dict[str, Any] = {"machine": {k: info[k] for k in ("cpu", "cpu_flags", "usable_cpus", "load_average")},
                              "size": args.size}
    result["diffusers_50_steps"] = diffusers_default(checkpoint, args.size)
    gc.collect()  # Diffusers' pipeline is gone with its function; its memory before diffrt's loads
    print(f"Diffusers, {DIFFUSERS_DEFAULT_STEPS} steps, guidance 7.5: {result['diffusers_50_steps']['seconds']:.1f} s",
          flush=True)
    key = f"diffrt_lcm_lora_4_steps_{args.vae}_vae"
    result[key] = diffrt_lcm_lora(package, args.size, args.rank, args.vae, args.diffrt_full_steps)
    print(f"diffrt, LCM-LoRA, 4 steps, guidance 1, {args.vae} VAE: {result[key]['seconds']:.1f} s", flush=True)
    result["speedup"] = result["diffusers_50_steps"]["seconds"] / result[key]["seconds"]
    result["load_average_after"] = list(os.getloadavg())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
