"""`diffrt bench PACKAGE_OR_PRESET ...`: latency per stage, side by side with Diffusers (see docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from diffrt.bench.presets import PRESETS
from diffrt.cli.args import comma_list, engine_option, int_list

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="PACKAGE_OR_PRESET",
                        help=f"model package folder, or a preset built on first use: {', '.join(PRESETS)}")
    parser.add_argument("--provider", default="cpu",
                        help="comma-separated providers, each a diffrt side run in the same interleaved benchmark: "
                             "cpu | openvino[:fp32|bf16|int8|auto] | auto | cuda[:graph|nhwc|graph+nhwc] | tensorrt | "
                             "trt | an ONNX Runtime provider name (default cpu)")
    parser.add_argument("--target", dest="export_target", default=None, choices=("onnxruntime", "cuda", "tensorrt"),
                        help="export target of a preset's package (default: tensorrt for trt, else onnxruntime; "
                             "cuda: ONNX Runtime's fused CUDA kernels, cuda sides only)")
    parser.add_argument("--vae", default="full",
                        help="full | tiny | full,tiny: the package's VAE and/or its tiny autoencoder (TAESD); "
                             "each value is a side per provider (default full)")
    parser.add_argument("--controlnet", type=int, default=0, metavar="N",
                        help="run the ControlNet pipeline with N ControlNets (1: single, 2-4: multi) on a control "
                             "image: a preset gets a package with N random-weight ControlNets (built on first use), "
                             "a package folder uses its first N; --compare diffusers runs Diffusers' ControlNet "
                             "pipeline on the same ControlNets (default 0: text-to-image alone)")
    parser.add_argument("--deep-cache", type=int_list, default=(), metavar="N[,N...]",
                        help="DeepCache intervals, each a diffrt side (1: off, so `1,3` measures both; PSNR against "
                        "the first side): a package folder must be exported with --deep-cache, a preset gets such "
                        "a package (built on first use)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's size)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale; > 1 runs CFG (default 7.5)")
    parser.add_argument("--scheduler", default=None, help="Diffusers scheduler class (default: the package's)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="warm-up images, the cold-start image included (default 1; 0: it is measured)")
    parser.add_argument("--runs", type=int, default=3, help="measured images per side (default 3)")
    parser.add_argument("--compare", type=comma_list, default=(), help="diffusers and/or optimum, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every side (default: usable CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None,
                        help="diffusers checkpoint for --compare diffusers (default: the package's source)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="run each side's images and close it before the next side loads (models too large to "
                             "hold twice); default: the sides stay loaded and their runs interleave")
    parser.add_argument("--engine-option", type=engine_option, action="append", default=None,
                        metavar="[COMPONENT:]KEY=VALUE",
                        help="an engine option of every diffrt side, for every engine or one component's "
                             "(repeatable), e.g. vae_decoder:graph_optimization_level=extended")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="write the full record here (and each sample to JSON.partial while running)")


def run(args: argparse.Namespace) -> int:
    from diffrt.bench.report import format_table, write_json
    from diffrt.bench.runner import BenchOptions, run_benchmark

    opts = BenchOptions(
        target=args.target, provider=args.provider, vae=args.vae, steps=args.steps, height=args.height,
        width=args.width,
        batch=args.batch, guidance=args.guidance, scheduler=args.scheduler, warmup=args.warmup, runs=args.runs,
        compare=tuple(args.compare), threads=args.threads, seed=args.seed, checkpoint=args.checkpoint,
        export_target=args.export_target, controlnets=args.controlnet, deep_cache=tuple(args.deep_cache),
        one_at_a_time=args.one_at_a_time, engine_options=tuple(args.engine_option or ()),
    )
    journal = f"{args.json_path}.partial" if args.json_path else None
    record = run_benchmark(opts, journal=journal)
    if journal is not None:
        write_json(args.json_path, record)
        os.unlink(journal)  # the record holds every sample now
        logger.info("wrote %s", args.json_path)
    sys.stdout.write(format_table(record) + "\n")
    return 0
