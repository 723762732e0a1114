#!/usr/bin/env python3
"""Where diffrt on CUDA differs, and where its time goes: the questions the first H200 run left (docs/benchmarks.md).

    python scripts/gpu_probe.py --preset sd15 --json probe.json          (GPU machine, presets already built)
    python scripts/gpu_probe.py --preset tiny --device cpu --json p.json  (a smoke run of the same code anywhere)

1. Components: each engine of the fp16 `onnxruntime`-target package on DEVICE against the same package on the CPU
   (same inputs), and the `cuda`-target package's components on DEVICE against the same CPU reference.
2. Images (same seed, few steps): diffrt on DEVICE (both targets) and on the CPU, Diffusers fp16 and fp32 on DEVICE
   and fp32 on the CPU; PSNR of every pair, so a disagreement is pinned to one side.
3. VAE decode: seconds per decode for engine option sets, Diffusers' decode beside them, and ONNX Runtime's
   profile (the ten most expensive operators) of the default set; the UNet's profile likewise.
The record is JSON; nothing is asserted (this is the measurement the GPU tests are then written from).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffrt.bench.report import psnr  # noqa: E402
from diffrt.bench.side import PROMPT  # noqa: E402

STEPS = 4


def package_of(preset: str, target: str) -> Path:
    cache = os.environ.get("DIFFRT_CACHE") or str(Path.home() / ".cache" / "diffrt")
    found = sorted(glob.glob(f"{cache}/presets/{preset}-*/package-fp16-{target}/diffrt.json"))
    if not found:
        raise SystemExit(f"no {preset} package-fp16-{target} under {cache}: build it with "
                         "python -m diffrt.bench.preset_build")
    return Path(found[-1]).parent


def engine(package: Path, name: str, device: str, **options: Any) -> Any:
    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.engines import create_engine

    provider = "cuda" if device == "cuda" else "cpu"
    return create_engine(ModelPackage.open(package).component(name), provider=provider, **options)


def component_inputs(package: Path, size: int) -> dict[str, dict[str, np.ndarray]]:
    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.tokenizer import CLIPTokenizer

    opened = ModelPackage.open(package)
    rng = np.random.default_rng(0)
    ids = CLIPTokenizer.from_folder(opened.tokenizer_dir("tokenizer"))([PROMPT, ""])
    hidden = int(opened.unet_config["cross_attention_dim"])
    latent = size // 8
    return {
        "text_encoder": {"input_ids": np.asarray(ids, dtype=np.int64)},
        "unet": {"sample": rng.standard_normal((2, 4, latent, latent), dtype=np.float32),
                 "timestep": np.array([501.0, 501.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)},
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, latent, latent), dtype=np.float32) * 5},
    }


def compare_components(ort_package: Path, cuda_package: Path, device: str, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, feeds in component_inputs(ort_package, size).items():
        reference = engine(ort_package, name, "cpu").run(feeds)
        for label, package in (("onnxruntime-target", ort_package), ("cuda-target", cuda_package)):
            if label == "cuda-target" and device != "cuda":
                continue
            got = engine(package, name, device).run(feeds)
            first = next(iter(reference))
            diff = float(np.max(np.abs(got[first].astype(np.float64) - reference[first])))
            scale = float(np.max(np.abs(reference[first])))
            out[f"{name} {label}"] = {"output": first, "max_abs_diff": diff, "reference_max_abs": scale,
                                      "finite": bool(np.isfinite(got[first]).all())}
    return out


def to_uint8(image: Any) -> np.ndarray:
    return (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def diffrt_image(package: Path, provider: str, size: int) -> np.ndarray:
    from diffrt.runtime import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(package, provider=provider)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=STEPS, generator=0, output_type="np")
    return to_uint8(out.images[0])


def diffusers_image(checkpoint: Path, device: str, dtype: str, size: int) -> np.ndarray:
    import diffusers
    import torch

    pipe = diffusers.DiffusionPipeline.from_pretrained(checkpoint, torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    with torch.inference_mode():
        image = pipe(PROMPT, height=size, width=size, num_inference_steps=STEPS, generator=generator,
                     output_type="np").images[0]
    del pipe
    return to_uint8(image)


def compare_images(ort_package: Path, cuda_package: Path, checkpoint: Path, device: str, size: int) -> dict:
    makers: dict[str, Callable[[], np.ndarray]] = {
        "diffrt cpu (onnxruntime-target fp16)": lambda: diffrt_image(ort_package, "cpu", size),
        f"diffrt {device} (onnxruntime-target fp16)": lambda: diffrt_image(ort_package, device, size),
        f"diffusers {device} fp32": lambda: diffusers_image(checkpoint, device, "float32", size),
        "diffusers cpu fp32": lambda: diffusers_image(checkpoint, "cpu", "float32", size),
    }
    if device == "cuda":
        makers["diffrt cuda (cuda-target fp16)"] = lambda: diffrt_image(cuda_package, "cuda", size)
        makers["diffusers cuda fp16"] = lambda: diffusers_image(checkpoint, "cuda", "float16", size)
    images, seconds = {}, {}
    for label, make in makers.items():
        start = time.perf_counter()
        images[label] = make()
        seconds[label] = time.perf_counter() - start
    labels = list(images)
    pairs = {f"{a} | {b}": psnr(images[a], images[b]) for i, a in enumerate(labels) for b in labels[i + 1:]}
    return {"steps": STEPS, "size": size, "seconds": seconds,
            "mean_pixel": {label: float(image.mean()) for label, image in images.items()},
            "psnr_db": {pair: ("inf" if value == float("inf") else value) for pair, value in pairs.items()}}


def seconds_per_run(run: Callable[[], Any], repeats: int = 5) -> float:
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def top_operators(package: Path, name: str, feeds: dict[str, np.ndarray], device: str) -> list[dict[str, Any]]:
    """ONNX Runtime's own profile of a few runs: the ten operator types that took the most time."""
    import onnxruntime as ort

    from diffrt.package.reader import ModelPackage

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / name)
    providers = ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(ModelPackage.open(package).component(name).path), options,
                                   providers=providers)
    for _ in range(3):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event.get("dur", 0) / 3 / 1000.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:10]
    return [{"op": op, "ms_per_run": ms} for op, ms in ranked]


def vae_sweep(ort_package: Path, cuda_package: Path, checkpoint: Path, device: str, size: int) -> dict[str, Any]:
    feeds = component_inputs(ort_package, size)["vae_decoder"]
    option_sets: list[tuple[str, Path, dict[str, Any]]] = [("onnxruntime-target default", ort_package, {})]
    if device == "cuda":
        option_sets += [
            ("onnxruntime-target heuristic", ort_package, {"conv_algo_search": "heuristic"}),
            ("onnxruntime-target nhwc", ort_package, {"prefer_nhwc": True}),
            ("onnxruntime-target power_of_two arena", ort_package, {"arena_growth": "power_of_two"}),
            ("cuda-target default", cuda_package, {}),
            ("cuda-target heuristic", cuda_package, {"conv_algo_search": "heuristic"}),
        ]
    out: dict[str, Any] = {"size": size, "seconds": {}}
    for label, package, options in option_sets:
        decoder = engine(package, "vae_decoder", device, **options)
        out["seconds"][label] = seconds_per_run(lambda: decoder.run(feeds))
    out["diffusers_seconds"] = diffusers_vae_seconds(checkpoint, feeds["latent_sample"], device)
    out["profile onnxruntime-target"] = top_operators(ort_package, "vae_decoder", feeds, device)
    if device == "cuda":
        out["profile cuda-target"] = top_operators(cuda_package, "vae_decoder", feeds, device)
        unet_feeds = component_inputs(cuda_package, size)["unet"]
        out["profile unet cuda-target"] = top_operators(cuda_package, "unet", unet_feeds, device)
    return out


def diffusers_vae_seconds(checkpoint: Path, latents: np.ndarray, device: str) -> float:
    import diffusers
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    vae = diffusers.AutoencoderKL.from_pretrained(checkpoint, subfolder="vae", torch_dtype=dtype).to(device)
    sample = torch.from_numpy(latents).to(device=device, dtype=dtype)

    def decode() -> None:
        with torch.inference_mode():
            vae.decode(sample)
        if device == "cuda":
            torch.cuda.synchronize()

    return seconds_per_run(decode)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", type=int, default=None, help="image side (default: the preset's)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    from diffrt.bench.presets import load_preset

    size = args.size or load_preset(args.preset).default_size
    ort_package = package_of(args.preset, "onnxruntime")
    cuda_package = package_of(args.preset, "cuda") if args.device == "cuda" else ort_package
    checkpoint = ort_package.parent / "checkpoint"
    record: dict[str, Any] = {"preset": args.preset, "device": args.device}
    sections = [("components", lambda: compare_components(ort_package, cuda_package, args.device, size)),
                ("images", lambda: compare_images(ort_package, cuda_package, checkpoint, args.device, size)),
                ("vae", lambda: vae_sweep(ort_package, cuda_package, checkpoint, args.device, size))]
    for key, section in sections:  # each section is written as soon as it is measured
        try:
            record[key] = section()
        except Exception as error:  # a failing section must not cost the others
            record[key] = {"error": f"{type(error).__name__}: {error}"}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(key, json.dumps(record[key], indent=1)[:4000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
