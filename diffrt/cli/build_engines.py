"""`diffrt build-engines PACKAGE`: TensorRT engines for a `--target tensorrt` package, on this GPU.

Argument errors exit with code 2 and one line naming the option and the allowed range (argparse's for malformed
values, `build_engines`' for values the package cannot take); TensorRT is imported only after all checks.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffrt.cli.args import batch_range, component_list, image_size, int_in, static_shape
from diffrt.errors import InputError

logger = logging.getLogger(__name__)

# How build_engines' error messages name each argument, as options of this command.
OPTION_NAMES = {"static": "--static", "min_size": "--min-size", "opt_size": "--opt-size", "max_size": "--max-size",
                "batch": "--batch", "buckets": "--bucket", "prompt_chunks": "--prompt-chunks",
                "precision": "--precision", "opt_level": "--opt-level", "components": "--components"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, help="model package exported with --target tensorrt")
    parser.add_argument("--components", type=component_list, default=None,
                        help="comma-separated components to build (default: all in the package)")
    parser.add_argument("--precision", default=None, choices=("fp16", "bf16", "fp32"),
                        help="engine precision (default: the package's; fp16 for an fp32 package)")
    sizes = parser.add_argument_group("sizes (pixels; default: a dynamic range around the model's native size)")
    sizes.add_argument("--static", type=static_shape, default=None, metavar="BxHxW",
                       help="one fixed shape, the fastest engine (e.g. 1x512x512)")
    sizes.add_argument("--min-size", type=image_size, default=None, metavar="HxW", help="dynamic range: smallest")
    sizes.add_argument("--opt-size", type=image_size, default=None, metavar="HxW", help="dynamic range: tuned for")
    sizes.add_argument("--max-size", type=image_size, default=None, metavar="HxW", help="dynamic range: largest")
    sizes.add_argument("--batch", type=batch_range, default=None, metavar="N|MIN:OPT:MAX",
                       help="images per call (default 1:1:4)")
    sizes.add_argument("--bucket", dest="buckets", type=image_size, action="append", default=None, metavar="HxW",
                       help="a fixed-size profile (repeatable; each is its own optimization profile)")
    sizes.add_argument("--prompt-chunks", type=int_in(1, 4), default=1, metavar="N",
                       help="longest prompt in 77-token chunks the UNet accepts (1-4, default 1)")
    sizes.add_argument("--no-cfg", dest="cfg", action="store_false", default=None,
                       help="no classifier-free guidance batches (default: CFG unless the UNet takes timestep_cond)")
    parser.add_argument("--opt-level", type=int_in(0, 5), default=3, help="builder optimization level 0-5 (3)")
    parser.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                        help="timing cache file, reused and updated by every build")
    parser.add_argument("--refit", action="store_true", help="refittable engines (new weights without a rebuild)")
    parser.add_argument("--version-compatible", action="store_true",
                        help="engines that also run on later TensorRT versions of the same major version")
    parser.add_argument("--hardware-compatible", action="store_true",
                        help="engines that run on any Ampere or newer GPU (slower than GPU-specific ones)")
    parser.add_argument("--rebuild", action="store_true", help="build again even when an identical engine exists")
    parser.add_argument("--device-id", type=int_in(0, 63), default=0, help="CUDA device to build on (0)")


def run(args: argparse.Namespace) -> int:
    from diffrt.export.tensorrt import build_engines

    records = build_engines(
        args.package, components=args.components, precision=args.precision, static=args.static,
        min_size=args.min_size, opt_size=args.opt_size, max_size=args.max_size, batch=args.batch,
        buckets=args.buckets, cfg=args.cfg, prompt_chunks=args.prompt_chunks, opt_level=args.opt_level,
        timing_cache=args.timing_cache, refit=args.refit, version_compatible=args.version_compatible,
        hardware_compatible=args.hardware_compatible, rebuild=args.rebuild, device_id=args.device_id,
        names=OPTION_NAMES,
    )
    logger.info("%d engine%s ready in %s", len(records), "" if len(records) == 1 else "s", args.package)
    return 0


def check_export(args: argparse.Namespace) -> None:
    """`diffrt export --tensorrt`: refuse it before the export when engines could not be built afterwards."""
    from diffrt.runtime.engines.tensorrt import check_trt_provider

    if args.target != "tensorrt":
        raise InputError(f"`--tensorrt` builds engines from a `--target tensorrt` export; got --target {args.target}")
    check_trt_provider()
