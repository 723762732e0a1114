"""Seconds per 512x512 image on the sd15 preset: 25 steps with classifier-free guidance (the package's scheduler,
guidance 7.5) vs LCM-LoRA with LCMScheduler at 4 steps, guidance 1 (docs/benchmarks.md, docs/adapters.md).

    python scripts/benchmark_lcm_lora.py [--preset-dir ~/.cache/diffrt/presets/sd15-<hash>] [--rank 64]

The LCM-LoRA is a random-weight file in latent-consistency/lcm-lora-sdv1-5's layout and rank
(`diffrt.bench.random_lora.LCM_LORA`): the same work per step as the real one, not its images. One run of each.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from diffrt.bench.random_lora import LCM_LORA, write_random_lora
from diffrt.bench.report import machine_info

PROMPT = "a castle on a hill, golden hour"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    presets = sorted((Path.home() / ".cache" / "diffrt" / "presets").glob("sd15-*"))
    parser.add_argument("--preset-dir", type=Path, default=presets[0] if presets else None)
    parser.add_argument("--rank", type=int, default=64)  # lcm-lora-sdv1-5's rank
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from diffrt.runtime import DiffusionPipeline
    from diffrt.schedulers import LCMScheduler

    info = machine_info()
    print(f"CPU: {info['cpu']}  flags: {' '.join(info['cpu_flags'])}  usable cpus: {info['usable_cpus']}  "
          f"load average: {info['load_average']}", flush=True)
    package = args.preset_dir / "package-fp32-onnxruntime"
    result: dict = {"machine": {k: info[k] for k in ("cpu", "cpu_flags", "usable_cpus", "load_average")}}
    pipe = DiffusionPipeline.from_pretrained(package, load="eager")
    pipe.set_progress_bar_config(disable=True)
    size = {"height": args.size, "width": args.size}
    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=25, generator=0, **size)
    result["seconds_25_steps_cfg"] = time.perf_counter() - start
    print(f"25 steps, guidance 7.5: {result['seconds_25_steps_cfg']:.1f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="diffrt-lcm-") as work:
        lora = write_random_lora(package, Path(work) / "lcm-lora.safetensors", rank=args.rank, layout=LCM_LORA)
        start = time.perf_counter()
        pipe.load_lora_weights(lora)
        result["load_lcm_lora_seconds"] = time.perf_counter() - start
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=0, **size)
    result["seconds_4_steps_lcm_lora"] = time.perf_counter() - start
    print(f"LCM-LoRA, 4 steps, guidance 1: {result['seconds_4_steps_lcm_lora']:.1f} s", flush=True)
    result["load_average_after"] = list(os.getloadavg())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
