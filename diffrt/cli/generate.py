"""`diffrt generate PACKAGE "prompt" ...`: one command from a model package to image files.

Every argument is checked before the package loads (inputs readable, outputs writable), so a mistake costs no
generation. Seeds follow AUTOMATIC1111: `--seed` omitted or -1 draws one; image i of `--num-images N` has seed
`seed + i` and its own generator, so any one of them is made again alone with its seed. Each file carries its
parameters as A1111's infotext (`runtime/infotext.py`), which `--from-png` reads back.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from diffrt.cli.args import (
    RANDOM_SEED,
    SEED_MAX,
    add_prompt_weighting,
    engine_option,
    float_list,
    int_list,
    lora_spec,
    number_in,
    positive_int,
    prompt_weighting,
    seed,
    utf8_text,
)
from diffrt.errors import DiffrtError, InputError, PackageError
from diffrt.runtime.generation import weighting_kwargs

logger = logging.getLogger(__name__)

TASKS = ("text2image", "image2image", "inpainting")
WEIGHT_FILES = ("*/*.safetensors", "*/*.bin")  # what a diffusers checkpoint folder holds instead of ONNX


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", nargs="?", help="model package folder, Hub repo id, or a built-in name (digits); "
                        "with --from-png, default: the image's `Model`")
    parser.add_argument("prompt", nargs="?", type=utf8_text, help="with --from-png, default: the image's prompt")
    parser.add_argument("-n", "--negative-prompt", type=utf8_text, default=None)
    add_prompt_weighting(parser)
    parser.add_argument("--steps", type=positive_int, default=None, help="num_inference_steps (pipeline default)")
    parser.add_argument("--guidance", type=number_in(0), default=None, help="guidance_scale (pipeline default)")
    parser.add_argument("--scheduler", "--sampler", default=None,
                        help='Diffusers class name or A1111 sampler name ("DPM++ 2M Karras", "LCM")')
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--sigmas", type=float_list, default=None, help="custom sigmas, descending, comma-separated")
    schedule.add_argument("--timesteps", type=int_list, default=None, help="custom timesteps, descending")
    schedule.add_argument("--ays", action="store_true", default=None,
                          help="Align-Your-Steps schedule for this model family")
    parser.add_argument("--seed", type=seed, default=None,
                        help="seed of the first image; image i gets seed + i (default or -1: a random seed)")
    parser.add_argument("--height", type=positive_int, default=None)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--num-images", type=positive_int, default=1,
                        help="images to make, each with its own seed; files are then named OUTPUT-SEED.EXT")
    parser.add_argument("--image", type=Path, default=None, help="input image: image-to-image (or inpainting)")
    parser.add_argument("--strength", type=number_in(0, 1, open_low=True), default=None,
                        help="with --image: how much of it to repaint, (0, 1] (pipeline default)")
    parser.add_argument("--mask", type=Path, default=None, help="mask image: inpainting (white = repaint)")
    parser.add_argument("--controlnet", action="append", default=None, metavar="NAME",
                        help="a ControlNet of the package (exported with `diffrt export --controlnet`); repeatable "
                        "(multi-ControlNet), each with its own --control-image")
    parser.add_argument("--control-image", action="append", type=Path, default=None, metavar="IMAGE",
                        help="the conditioning image (pose, depth, edges, ...) of each --controlnet, in order")
    parser.add_argument("--control-scale", action="append", type=number_in(0), default=None, metavar="SCALE",
                        help="controlnet_conditioning_scale: once for all ControlNets or once per --controlnet "
                        "(pipeline default: 1.0; 0.8 image-to-image, 0.5 inpainting)")
    parser.add_argument("--guess-mode", action="store_true", default=None,
                        help="ControlNet guess mode: the ControlNets see no prompt (Diffusers' guess_mode)")
    parser.add_argument("--deep-cache", type=positive_int, default=None, metavar="N",
                        help="DeepCache: the full UNet every N steps, the package's shallow UNet between (a package "
                        "exported with `diffrt export --deep-cache`; 1: off)")
    parser.add_argument("--deep-cache-schedule", choices=("uniform", "nonuniform"), default=None,
                        help="with --deep-cache: which steps run the full UNet: uniform (0, N, 2N, ...; default) or "
                        "nonuniform (as many, densest at the start: closer to the full UNet's image)")
    parser.add_argument("--revision", default=None, help="with a Hub repo id: the branch, tag or commit")
    parser.add_argument("--provider", default="cpu",
                        help="cpu, cuda, tensorrt (ONNX Runtime), openvino[:fp32|bf16|int8|auto] (OpenVINO and its "
                             "inference precision), auto, or trt (native TensorRT engines built with "
                             "`diffrt build-engines`)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads per engine (default: the physical cores this process may use)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="with --provider cuda or trt: replay each shape's GPU work as a CUDA graph")
    parser.add_argument("--engine-option", type=engine_option, action="append", default=None,
                        metavar="[COMPONENT:]KEY=VALUE",
                        help="an engine option for every engine, or for one component's (repeatable), e.g. "
                             "vae_decoder:graph_optimization_level=extended (a lower VAE peak, a slower decode)")
    parser.add_argument("--vae", default=None, choices=("full", "tiny"),
                        help="full (default): the package's VAE; tiny: its tiny autoencoder (exported with --tiny-vae)")
    parser.add_argument("--lora", type=lora_spec, action="append", default=None, metavar="PATH[:SCALE]",
                        help="apply a LoRA (.safetensors: kohya / A1111 or Diffusers / PEFT) at SCALE (default 1); "
                             "repeat for several")
    parser.add_argument("-o", "--output", type=Path, default=Path("image.png"),
                        help="image file: .png (with the parameters as text), .jpg/.jpeg or .webp (in EXIF)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--from-png", type=Path, default=None, metavar="IMAGE",
                        help="make an image again from the parameters in IMAGE (PNG text or JPEG/WebP EXIF, as "
                        "diffrt and AUTOMATIC1111 write them); options given here override them")


def run(args: argparse.Namespace) -> int:
    from diffrt.cli import image_files

    made_with = _apply_png(args) if args.from_png is not None else None
    task = _check_arguments(args)
    seeds = _seeds(args.seed, args.num_images)
    paths = image_files.output_paths(args.output, seeds)
    for path in paths:
        image_files.check_output(path, args.overwrite)
    inputs = _input_images(args)
    _check_loras(args)
    start = time.perf_counter()
    pipe = _load(args, task, from_png=made_with is not None)
    load_seconds = time.perf_counter() - start
    kwargs = {**_call_kwargs(args, pipe), **inputs, "generator": list(seeds)}
    _warn_other_model(args, pipe, made_with)
    result = pipe(**kwargs)
    for image, image_seed, path in zip(result.images, seeds, paths):
        text, record = _parameters(args, pipe, task, kwargs, image, image_seed)
        image_files.write_image(image, path, text, record, args.overwrite)
        print(f"wrote {os.fsdecode(path)} (seed {image_seed})")
    print(timing_line(load_seconds, result.timings))
    return 0


def timing_line(load_seconds: float, timings: dict[str, float]) -> str:
    """`load 0.52s  text_encoder 0.01s  unet 1.20s ...`: engine creation is load, never a compute stage."""
    stages = {"load": load_seconds + timings.get("load", 0.0)}
    stages.update((stage, seconds) for stage, seconds in timings.items() if stage != "load")
    return "  ".join(f"{stage} {seconds:.2f}s" for stage, seconds in stages.items())


# ----- arguments -----
def _apply_png(args: argparse.Namespace) -> str | None:
    """Fill every option not given on the command line from the image's infotext (and, for what the infotext
    cannot say, diffrt's JSON beside it); returns the image's model hash (or None)."""
    from diffrt.cli import image_files
    from diffrt.runtime import infotext

    text, record = image_files.read_parameters(args.from_png)
    parsed = infotext.parse_infotext(text)
    fields = parsed.fields
    where = f"`--from-png` {os.fsdecode(args.from_png)!r}"

    def fill(name: str, value: Any) -> None:
        if getattr(args, name) is None and value is not None:
            setattr(args, name, value)

    def field(key: str, parse: Any) -> Any:
        if key not in fields:
            return None
        try:
            return parse(fields[key])
        except (argparse.ArgumentTypeError, DiffrtError) as error:
            raise InputError(f"{where}: infotext `{key}`: {error}") from None

    fill("package", fields.get("Model"))
    fill("prompt", parsed.prompt)
    fill("negative_prompt", parsed.negative_prompt or None)
    fill("steps", field("Steps", positive_int))
    fill("guidance", field("CFG scale", number_in(0)))
    fill("seed", field("Seed", seed))
    if "Denoising strength" in fields:
        if args.image is None:
            raise InputError(f"{where} was made from an input image (it has a `Denoising strength`): pass that "
                             "image with --image")
        fill("strength", field("Denoising strength", number_in(0, 1, open_low=True)))
    elif args.image is None and args.height is None and args.width is None and "Size" in fields:
        args.height, args.width = field("Size", infotext.parse_size)
    if args.scheduler is None and not args.ays and args.sigmas is None and args.timesteps is None:
        args.scheduler, args.ays = infotext.scheduler_from_fields(fields)
        if not args.ays:  # custom schedules exist in diffrt's JSON only
            args.sigmas, args.timesteps = record.get("sigmas"), record.get("timesteps")
    fill("vae", record.get("vae"))
    fill("deep_cache", record.get("deep_cache_interval"))
    fill("deep_cache_schedule", record.get("deep_cache_schedule"))
    return fields.get("Model hash", "")


def _check_arguments(args: argparse.Namespace) -> str:
    """The task; InputError for combinations argparse cannot check."""
    if args.package is None or args.prompt is None:
        raise InputError("`PACKAGE` and `PROMPT` are required (or `--from-png IMAGE`, which has both)")
    if args.mask is not None and args.image is None:
        raise InputError("`--mask` needs `--image`: the image to inpaint")
    if args.strength is not None and args.image is None:
        raise InputError("`--strength` needs `--image`: it says how much of the input image to repaint")
    if args.image is not None and args.mask is None and (args.height or args.width):
        raise InputError("`--height`/`--width` do not apply to image-to-image: resize the input image instead")
    if args.cuda_graph and args.provider not in ("trt", "cuda"):
        raise InputError(f"`--cuda-graph` needs `--provider cuda` or `--provider trt`; got --provider "
                         f"{args.provider!r}")
    if args.seed is not None and args.seed != RANDOM_SEED and args.seed + args.num_images - 1 > SEED_MAX:
        raise InputError(f"`--seed` {args.seed} + `--num-images` {args.num_images} passes the largest seed, 2**63 - 1")
    _check_control(args)
    if args.deep_cache_schedule is not None and args.deep_cache in (None, 1):
        raise InputError("`--deep-cache-schedule` applies with `--deep-cache N` (N >= 2) only")
    args.vae = args.vae or "full"
    return "inpainting" if args.mask is not None else "image2image" if args.image is not None else "text2image"


def _check_control(args: argparse.Namespace) -> None:
    names, images, scales = args.controlnet or [], args.control_image or [], args.control_scale or []
    if images and not names:
        raise InputError("`--control-image` needs `--controlnet NAME`: which of the package's ControlNets it steers")
    if len(images) != len(names):
        raise InputError(f"give one `--control-image` per `--controlnet`: got {len(names)} ControlNet(s) and "
                         f"{len(images)} image(s)")
    if len(scales) not in (0, 1, len(names)) or (scales and not names):
        raise InputError(f"give `--control-scale` once (for every ControlNet) or once per `--controlnet` "
                         f"({len(names)}); got {len(scales)}")
    if args.guess_mode and not names:
        raise InputError("`--guess-mode` needs `--controlnet NAME`")
    if names and args.deep_cache not in (None, 1):
        raise InputError("`--deep-cache` does not combine with `--controlnet`: ControlNets steer every skip connection "
                         "at every step, which DeepCache's cached features would drop")


def _seeds(first: int | None, count: int) -> list[int]:
    from diffrt.runtime.generation import seeds_for

    return seeds_for(first, count, "--seed")


def _input_images(args: argparse.Namespace) -> dict[str, Any]:
    from diffrt.cli.image_files import open_image

    images: dict[str, Any] = {}
    if args.image is not None:
        images["image"] = open_image(args.image, "--image", "RGB")
    if args.mask is not None:
        images["mask_image"] = open_image(args.mask, "--mask", "L")
    if args.control_image:
        control = [open_image(path, "--control-image", "RGB") for path in args.control_image]
        # text-to-image takes the control image as `image`; image-to-image and inpainting as `control_image`
        images["control_image" if args.image is not None else "image"] = control[0] if len(control) == 1 else control
    return images


# ----- the pipeline -----
def _load(args: argparse.Namespace, task: str, from_png: bool) -> Any:
    from diffrt.runtime.engines import split_engine_options, split_precision
    from diffrt.runtime.pipelines.auto import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        plain_pipeline,
    )

    auto = dict(zip(TASKS, (AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting)))[task]
    _refuse_checkpoint(args.package)
    options: dict[str, Any] = {"cuda_graph": True} if args.cuda_graph else {}
    provider, precision = split_precision(args.provider)
    options.update(precision)
    if args.threads is not None:
        options["threads"] = args.threads
    if args.deep_cache_schedule is not None:
        options["deep_cache_schedule"] = args.deep_cache_schedule
    common, per_component = split_engine_options(args.engine_option or ())
    options.update(common)
    if per_component:
        options["component_options"] = per_component
    if args.controlnet:
        options["controlnet"] = args.controlnet
        open_pipeline = auto.from_pretrained
    else:
        open_pipeline = functools.partial(plain_pipeline, task)  # a ControlNet package runs without them
    try:
        # load="eager": every engine is created here, so the timing line's "load" holds all of it
        pipe = open_pipeline(args.package, provider=provider, vae=args.vae, revision=args.revision,
                             load="lazy" if args.lora else "eager", **options)
    except PackageError as error:
        if not from_png:
            raise
        raise InputError(f"{error} (the package named by the image's `Model`; pass PACKAGE to use another)") from None
    if args.lora:
        _load_loras(pipe, args.lora)
        pipe.load_engines()
    pipe.set_progress_bar_config(disable=True if getattr(args, "quiet", False) else None)  # None: terminals only
    if args.scheduler:
        pipe.scheduler = _scheduler(pipe, args.scheduler)
    return pipe


def _check_loras(args: argparse.Namespace) -> None:
    from diffrt.runtime.pipelines.lora_api import check_lora_source

    for path, _ in args.lora or []:
        check_lora_source(path)


def _load_loras(pipe: Any, loras: list[tuple[Path, float]]) -> None:
    """Each `--lora` as an adapter named after its file (made unique), all active at their scales."""
    names: list[str] = []
    for path, _ in loras:
        name = path.stem or "lora"
        name = name if name not in names else f"{name}_{len(names)}"
        pipe.load_lora_weights(path, adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])


def _refuse_checkpoint(package: str) -> None:
    """A diffusers checkpoint (weights, no ONNX) is what `diffrt export` reads, not what the runtime runs: say so
    instead of naming the first missing model.onnx."""
    from diffrt.package.names import INDEX_NAME, MODEL_FILE
    from diffrt.runtime.builtin import resolve_builtin

    path = Path(resolve_builtin(package))
    is_folder = (path / INDEX_NAME).is_file() and not any(path.glob(f"*/{MODEL_FILE}"))
    checkpoint = is_folder and any(any(path.glob(pattern)) for pattern in WEIGHT_FILES)
    single_file = path.is_file() and path.suffix in (".safetensors", ".ckpt")
    if checkpoint or single_file:
        raise InputError(f"{package!r} is a diffusers checkpoint, not a model package: run `diffrt export {package} "
                         f"{path.stem}-onnx` first, then generate from {path.stem}-onnx")


def _scheduler(pipe: Any, name: str) -> Any:
    from diffrt.runtime.generation import scheduler_for

    return scheduler_for(pipe.scheduler.config, name)


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
    kwargs: dict[str, Any] = {"prompt": args.prompt, "negative_prompt": args.negative_prompt,
                              "num_images_per_prompt": args.num_images}
    optional = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "height": args.height,
                "width": args.width, "strength": args.strength, "sigmas": args.sigmas, "timesteps": args.timesteps,
                "deep_cache_interval": args.deep_cache}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    _check_accepted(pipe, kwargs)
    if args.control_scale:
        scales = args.control_scale
        kwargs["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    if args.guess_mode:
        kwargs["guess_mode"] = True
    if args.ays:
        kwargs.update(_ays(pipe, args.steps))
    kwargs.update(weighting_kwargs(pipe, prompt_weighting(args)))
    return kwargs


def _check_accepted(pipe: Any, kwargs: dict[str, Any]) -> None:
    """An option this package's pipeline has no argument for (`--timesteps` on SD3 / FLUX, whose schedules are
    sigmas) is named, not passed on to fail as a TypeError."""
    from diffrt.runtime.generation import call_defaults

    accepted = call_defaults(pipe)
    for name in kwargs:
        if name not in accepted:
            option = {"num_inference_steps": "steps", "guidance_scale": "guidance",
                      "num_images_per_prompt": "num-images",
                      "deep_cache_interval": "deep-cache"}.get(name, name.replace("_", "-"))
            raise InputError(f"`--{option}` does not apply to a {pipe.package.pipeline_class} package")


def _warn_other_model(args: argparse.Namespace, pipe: Any, made_with: str | None) -> None:
    from diffrt.runtime.infotext import model_hash

    ours = model_hash(pipe.package.manifest)
    if made_with and ours and made_with != ours:
        logger.warning("%s was made with model hash %s; %s has %s, so the image will differ",
                       os.fsdecode(args.from_png), made_with, args.package, ours)


# ----- what each file records -----
def _parameters(args: argparse.Namespace, pipe: Any, task: str, kwargs: dict[str, Any], image: Any,
                image_seed: int) -> tuple[str, dict[str, Any]]:
    """(A1111 infotext, diffrt's JSON record) of one image."""
    from diffrt import __version__
    from diffrt.runtime.generation import call_defaults, infotext_fields
    from diffrt.runtime.infotext import format_infotext, model_hash

    defaults = call_defaults(pipe)
    steps = _steps(kwargs, defaults)
    guidance = kwargs.get("guidance_scale", defaults.get("guidance_scale"))
    strength = kwargs.get("strength", defaults.get("strength")) if task != "text2image" else None
    width, height = image.size
    digest = model_hash(pipe.package.manifest)
    fields = infotext_fields(pipe, pipe.scheduler, steps=steps, guidance=guidance, seed=image_seed, width=width,
                             height=height, model=_model_name(args.package), strength=strength, ays=bool(args.ays))
    record = {
        "diffrt": __version__, "package": args.package, "model_hash": digest, "pipeline": pipe.package.pipeline_class,
        "task": task, "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": image_seed,
        "num_inference_steps": steps, "guidance_scale": guidance, "height": height, "width": width,
        "strength": strength, "sigmas": args.sigmas, "timesteps": args.timesteps, "ays": bool(args.ays),
        "scheduler": type(pipe.scheduler).__name__, "scheduler_config": dict(pipe.scheduler.config),
        "provider": args.provider, "vae": args.vae, "deep_cache_interval": args.deep_cache,
        "deep_cache_schedule": pipe.deep_cache_schedule if args.deep_cache not in (None, 1) else None,
        "loras": [{"path": os.fsdecode(path), "scale": scale} for path, scale in args.lora or []],
        "image": None if args.image is None else os.fsdecode(args.image),
        "mask": None if args.mask is None else os.fsdecode(args.mask),
        "controlnet": args.controlnet, "control_image": [os.fsdecode(p) for p in args.control_image or []] or None,
        "controlnet_conditioning_scale": kwargs.get("controlnet_conditioning_scale",
                                                    defaults.get("controlnet_conditioning_scale"))
        if args.controlnet else None,
        "guess_mode": bool(args.guess_mode) if args.controlnet else None,
    }
    return format_infotext(args.prompt, args.negative_prompt, fields), record


def _steps(kwargs: dict[str, Any], defaults: dict[str, Any]) -> int:
    """The steps the schedule has: custom timesteps or sigmas (less the final 0) override num_inference_steps."""
    if kwargs.get("timesteps") is not None:
        return len(kwargs["timesteps"])
    if kwargs.get("sigmas") is not None:
        return sum(1 for sigma in kwargs["sigmas"] if sigma > 0)
    return int(kwargs.get("num_inference_steps") or defaults["num_inference_steps"])


def _model_name(package: str) -> str:
    from diffrt.runtime.generation import model_name

    return model_name(package)
