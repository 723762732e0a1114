"""DeepCache's speed and quality on a package, several `deep_cache_interval`s in one run (docs/benchmarks.md).

    python scripts/benchmark_deep_cache.py PACKAGE [--intervals 1,2,3,5] [--steps 20] [--size 512] [--seeds 0]
                                           [--runs 3] [--provider cpu] [--reference-provider cpu]
                                           [--schedule uniform|nonuniform]
                                           [--threads N] [--json OUT]
    python scripts/benchmark_deep_cache.py digits [--branch 0] [...]

PACKAGE must be exported with DeepCache (`diffrt export SOURCE OUTPUT --deep-cache`). `digits` first exports the
built-in model's checkpoint (tests/data/digits_checkpoint) with DeepCache at `--branch` into a temporary folder
(needs the export extra), and also scores each interval with the digits quality oracle (scripts/digits/quality.py:
an SVC fit on held-out digits labels 10 digits x 8 seeds): its accuracy with and without DeepCache.

Interval 1 is the plain UNet, and its images are the reference: each interval's images (same prompt, same seeds)
get their PSNR against them (per image, then the mean and the lowest). With `--reference-provider` the reference is
that provider's full-UNet images instead (openvino:bf16 against cpu: bf16's rounding and DeepCache together). Time:
the pipeline's own "unet" stage (full and shallow UNet runs together) per image, the median of `--runs` calls after
one warm-up call per interval; the calls of the intervals are interleaved, so machine drift falls on all of them
alike.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from diffrt.bench.report import machine_info, psnr  # noqa: E402
from diffrt.cli.args import int_list, positive_int  # noqa: E402
from diffrt.runtime import DiffusionPipeline  # noqa: E402
from diffrt.runtime.pipelines.deep_cache import SCHEDULES, full_steps  # noqa: E402

DIGITS_CHECKPOINT = ROOT / "tests" / "data" / "digits_checkpoint"
PROMPT = "a photo of an astronaut riding a horse on the moon, high quality"
DIGITS_PROMPT = "a handwritten seven"
logger = logging.getLogger("benchmark_deep_cache")


def export_digits(folder: Path, branch: int) -> Path:
    from diffrt.export import export_pipeline

    start = time.perf_counter()
    package = export_pipeline(DIGITS_CHECKPOINT, folder / "digits-deep-cache", deep_cache=True,
                              deep_cache_branch=branch)
    logger.info("exported %s with DeepCache (branch %d) in %.0f s", DIGITS_CHECKPOINT, branch,
                time.perf_counter() - start)
    return package


def unet_runs(pipe: DiffusionPipeline, steps: int, interval: int) -> dict[str, int]:
    """Full and shallow UNet runs per image of the call's schedule (a scheduler may have more timesteps than
    `steps`, PNDM one more)."""
    scheduler = pipe.fresh_scheduler()
    scheduler.set_timesteps(steps)
    count = len(scheduler.timesteps)
    full = len(full_steps(count, interval, pipe.deep_cache_schedule)) if interval > 1 else count
    return {"full": full, "shallow": count - full}


def image_psnr(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean, lowest) PSNR in dB of [0, 1] images against the reference images, image by image."""
    values = [psnr(image, ref, peak=1.0) for image, ref in zip(images, reference)]
    finite = [value for value in values if np.isfinite(value)]
    if len(finite) < len(values):
        return float("inf"), min(values)
    return float(np.mean(values)), float(min(values))


def measure(pipe: DiffusionPipeline, intervals: list[int], call: dict[str, Any], runs: int,
            reference: np.ndarray | None = None) -> dict[int, dict]:
    """UNet seconds per image (median over `runs` interleaved calls) and the images of each interval, with their
    PSNR against `reference` (default: interval 1's images)."""
    images_per_call = len(call["generator"])
    images: dict[int, np.ndarray] = {}
    seconds: dict[int, list[float]] = {n: [] for n in intervals}
    for n in intervals:  # warm-up: engines created and every shape prepared before anything is timed
        images[n] = np.asarray(pipe(**call, deep_cache_interval=n).images)
    for run in range(runs):
        for n in intervals if run % 2 == 0 else list(reversed(intervals)):
            out = pipe(**call, deep_cache_interval=n)
            seconds[n].append(out.timings["unet"] / images_per_call)
    if reference is None:
        reference = images[1] if 1 in images else images[intervals[0]]
    results = {}
    for n in intervals:
        mean, lowest = image_psnr(images[n], reference)
        results[n] = {"unet_s_per_image": statistics.median(seconds[n]), "unet_s_samples": seconds[n],
                      "psnr_db_mean": mean, "psnr_db_min": lowest}
    return results


def digits_accuracy(pipe: DiffusionPipeline, intervals: list[int], steps: int,
                    reference_pipe: DiffusionPipeline | None = None) -> dict[int | str, dict]:
    """The quality oracle's accuracy on 10 digits x 8 seeds per interval, and those images' PSNR against
    interval 1's (or, with `reference_pipe`, against that pipeline's full-UNet images, whose accuracy is the
    "reference" entry)."""
    from digits import quality

    oracle = quality.fit_oracle()
    grids: dict[int | str, np.ndarray] = {
        n: quality.generate(pipe, num_inference_steps=steps, deep_cache_interval=n) for n in intervals}
    if reference_pipe is not None:
        grids["reference"] = quality.generate(reference_pipe, num_inference_steps=steps)
    reference = grids.get("reference", grids[1] if 1 in grids else grids[intervals[0]])
    out = {}
    for n, grid in grids.items():
        flat, ref = grid.reshape(-1, *grid.shape[2:]), reference.reshape(-1, *reference.shape[2:])
        mean, lowest = image_psnr(flat, ref)
        out[n] = {"accuracy": quality.accuracy(oracle, grid), "images": int(flat.shape[0]),
                  "psnr_db_mean": mean, "psnr_db_min": lowest}
    return out


def table(record: dict[str, Any]) -> str:
    rows = [f"{'interval':>8} {'full/shallow':>13} {'unet s/img':>11} {'speed-up':>9} {'PSNR mean':>10} "
            f"{'PSNR min':>9}" + (f" {'digits acc':>11}" if record.get("digits") else "")]
    base = record["results"].get("1", next(iter(record["results"].values())))["unet_s_per_image"]
    for key, result in record["results"].items():
        runs = record["unet_runs"][key]
        line = (f"{key:>8} {runs['full']:>6}/{runs['shallow']:<6} {result['unet_s_per_image']:>11.4f} "
                f"{base / result['unet_s_per_image']:>8.2f}x {result['psnr_db_mean']:>10.2f} "
                f"{result['psnr_db_min']:>9.2f}")
        if record.get("digits"):
            digits = record["digits"][key]
            line += f" {digits['accuracy']:>6.3f} ({round(digits['accuracy'] * digits['images'])}/{digits['images']})"
        rows.append(line)
    reference = (record.get("digits") or {}).get("reference")
    if reference:
        rows.append(f"PSNR against {record['reference_provider']}'s full UNet, whose digits accuracy is "
                    f"{reference['accuracy']:.3f} ({round(reference['accuracy'] * reference['images'])}/"
                    f"{reference['images']})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", help="a package exported with --deep-cache, or `digits`")
    parser.add_argument("--intervals", type=int_list, default=[1, 2, 3, 5])
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's)")
    parser.add_argument("--seeds", type=int_list, default=None, help="one image per seed (default 0; digits 0-3)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--branch", type=int, default=0, help="digits: the DeepCache branch to export")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--schedule", choices=SCHEDULES, default="uniform",
                        help="the pipeline's deep_cache_schedule: which steps run the full UNet")
    parser.add_argument("--reference-provider", default=None,
                        help="PSNR against this provider's full-UNet images (e.g. cpu, for openvino:bf16's "
                             "narrower math plus DeepCache against fp32) instead of --provider's interval 1")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", dest="json_path", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    intervals = sorted(set(args.intervals) | {1})
    digits = args.package == "digits"
    with tempfile.TemporaryDirectory(prefix="deep-cache-bench-") as scratch:
        package = export_digits(Path(scratch), args.branch) if digits else Path(args.package)
        options = {"threads": args.threads} if args.threads else {}
        pipe = DiffusionPipeline.from_pretrained(package, provider=args.provider, load="eager",
                                                 deep_cache_schedule=args.schedule, **options)
        pipe.set_progress_bar_config(disable=True)
        size = args.size or pipe.default_size()
        seeds = args.seeds or ([0, 1, 2, 3] if digits else [0])
        call = dict(prompt=DIGITS_PROMPT if digits else PROMPT, height=size, width=size,
                    num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np",
                    num_images_per_prompt=len(seeds), generator=list(seeds))
        reference_pipe = None
        if args.reference_provider:
            reference_pipe = DiffusionPipeline.from_pretrained(package, provider=args.reference_provider,
                                                               load="eager", **options)
            reference_pipe.set_progress_bar_config(disable=True)
        reference = None if reference_pipe is None else np.asarray(reference_pipe(**call).images)
        results = measure(pipe, intervals, call, args.runs, reference)
        record: dict[str, Any] = {
            "package": str(args.package), "branch": pipe.package.deep_cache_branch, "provider": args.provider,
            "reference_provider": args.reference_provider, "schedule": args.schedule,
            "steps": args.steps, "size": size, "seeds": seeds, "guidance": args.guidance, "runs": args.runs,
            "scheduler": type(pipe.scheduler).__name__, "machine": machine_info(),
            "unet_runs": {str(n): unet_runs(pipe, args.steps, n) for n in intervals},
            "results": {str(n): result for n, result in results.items()},
        }
        if digits:
            accuracy = digits_accuracy(pipe, intervals, args.steps, reference_pipe)
            record["digits"] = {str(n): result for n, result in accuracy.items()}
    print(table(record))
    if args.json_path is not None:
        args.json_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
