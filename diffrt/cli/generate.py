"""`diffrt generate PACKAGE "prompt" ...`: one command from a model package to PNG files."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffrt.cli.args import float_list, int_list
from diffrt.errors import InputError

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", help="model package folder, Hub repo id, or a built-in name")
    parser.add_argument("prompt")
    parser.add_argument("-n", "--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (pipeline default if omitted)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (pipeline default if omitted)")
    parser.add_argument("--scheduler", default=None, help='Diffusers class name or A1111 name ("DPM++ 2M Karras")')
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--sigmas", type=float_list, default=None, help="custom sigmas, descending, comma-separated")
    schedule.add_argument("--timesteps", type=int_list, default=None, help="custom timesteps, descending")
    schedule.add_argument("--ays", action="store_true", help="Align-Your-Steps schedule for this model family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--image", type=Path, default=None, help="input image: image-to-image (or inpainting)")
    parser.add_argument("--strength", type=float, default=None)
    parser.add_argument("--mask", type=Path, default=None, help="mask image: inpainting (white = repaint)")
    parser.add_argument("--provider", default="cpu",
                        help="cpu, cuda, tensorrt (ONNX Runtime), openvino, auto, or trt (native TensorRT engines "
                             "built with `diffrt build-engines`)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="with --provider cuda or trt: replay each shape's GPU work as a CUDA graph")
    parser.add_argument("--vae", default="full", choices=("full", "tiny"),
                        help="full: the package's VAE; tiny: its tiny autoencoder (exported with --tiny-vae)")
    parser.add_argument("-o", "--output", type=Path, default=Path("image.png"))


def _task(args: argparse.Namespace) -> str:
    if args.mask is not None and args.image is None:
        raise InputError("`--mask` needs `--image`")
    return "inpainting" if args.mask is not None else "image2image" if args.image is not None else "text2image"


def _scheduler(pipe: Any, name: str) -> Any:
    from diffrt import schedulers

    if name in schedulers.registered_names():
        scheduler_class = schedulers.get_scheduler_class(name)
        return scheduler_class.from_config(pipe.scheduler.config)
    return schedulers.from_name(name, pipe.scheduler.config)


def _ays(pipe: Any, steps: int | None) -> dict[str, Any]:
    from diffrt.runtime.pipelines.registry import family_of
    from diffrt.schedulers import ays_schedule

    family = "StableDiffusionXL" if family_of(pipe.package.pipeline_class) == "sdxl" else "StableDiffusion"
    schedule = ays_schedule(family, steps or 10)
    # Sigma-space schedulers take the AYS sigmas (as in the Diffusers docs); the others its timesteps.
    if hasattr(pipe.scheduler, "sigmas") and "Euler" in type(pipe.scheduler).__name__:
        return {"sigmas": [float(s) for s in schedule.sigmas]}
    return {"timesteps": [int(t) for t in schedule.timesteps]}


def _call_kwargs(args: argparse.Namespace, pipe: Any) -> dict[str, Any]:
    from PIL import Image

    kwargs: dict[str, Any] = {"prompt": args.prompt, "negative_prompt": args.negative_prompt,
                              "num_images_per_prompt": args.num_images, "generator": args.seed}
    optional = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": args.height,
                "width": args.width, "strength": args.strength, "sigmas": args.sigmas, "timesteps": args.timesteps}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if args.ays:
        kwargs.update(_ays(pipe, args.steps))
    if args.image is not None:
        kwargs["image"] = Image.open(args.image).convert("RGB")
    if args.image is not None and args.mask is None:  # image-to-image takes its size from the image
        if args.height or args.width:
            raise InputError("`--height`/`--width` do not apply to image-to-image: resize the input image instead")
    if args.mask is not None:
        kwargs["mask_image"] = Image.open(args.mask).convert("L")
    return kwargs


def _save(images: list, output: Path, metadata: dict[str, Any]) -> list[Path]:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(metadata, default=str))
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = output if len(images) == 1 else output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}")
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from diffrt.runtime.pipelines.auto import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
    )

    task = _task(args)
    auto = {"text2image": AutoPipelineForText2Image, "image2image": AutoPipelineForImage2Image,
            "inpainting": AutoPipelineForInpainting}[task]
    start = time.perf_counter()
    if args.cuda_graph and args.provider not in ("trt", "cuda"):
        raise InputError(f"`--cuda-graph` needs `--provider cuda` or `--provider trt`; got --provider "
                         f"{args.provider!r}")
    options: dict[str, Any] = {"cuda_graph": True} if args.cuda_graph else {}
    pipe = auto.from_pretrained(args.package, provider=args.provider, vae=args.vae, **options)
    if args.scheduler:
        pipe.scheduler = _scheduler(pipe, args.scheduler)
    load_seconds = time.perf_counter() - start
    kwargs = _call_kwargs(args, pipe)
    # Every concrete pipeline class defines __call__; the DiffusionPipeline base that from_pretrained returns does not.
    result = pipe(**kwargs)
    metadata = {k: v for k, v in kwargs.items() if k not in ("image", "mask_image")}
    metadata.update(package=str(args.package), scheduler=type(pipe.scheduler).__name__, provider=args.provider,
                    vae=args.vae)
    paths = _save(result.images, args.output, metadata)
    for path in paths:
        print(f"wrote {path}")
    timings = {"load": load_seconds, **result.timings}
    print("  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timings.items()))
    return 0
