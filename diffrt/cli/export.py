"""`diffrt export SOURCE OUTPUT ...`: a diffusers checkpoint to a model package (and `--tiny-vae ... --into`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffrt.cli.args import component_list
from diffrt.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="diffusers folder, Hub repo id (owner/name) or single .safetensors "
                        "file (omitted with --into)")
    parser.add_argument("output", type=Path, nargs="?", help="model package folder to create (omitted with --into)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--config-folder", type=Path, default=None, metavar="FOLDER",
                        help="single .safetensors SOURCE only: a diffusers folder of the same model whose configs and "
                        "tokenizers to use and whose components the file lacks to take (needed for FLUX.1 "
                        "transformer-only files and SD3.5 files without text encoders)")
    parser.add_argument("--variant", default=None, help="weight variant to read, e.g. fp16")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--target", default="onnxruntime", choices=("onnxruntime", "tensorrt", "cuda"),
                        help="onnxruntime: opset 23, fused attention ops, runs on ONNX Runtime and OpenVINO; "
                        "tensorrt: opset 18; cuda: ONNX Runtime CUDA only, UNet/VAE built from its fused diffusion "
                        "kernels (MultiHeadAttention, NHWC GroupNorm; fastest with --provider cuda)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="with --target tensorrt: then build TensorRT engines on this GPU (build-engines defaults)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: per target)")
    parser.add_argument("--components", type=component_list, default=None,
                        help="comma-separated subset of text_encoder,text_encoder_2,unet,vae_encoder,vae_decoder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT if it is a model package (diffrt or Optimum layout) holding nothing else; "
                        "any other folder is refused (docs/package-format.md)")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the ONNX Runtime vs torch check")
    parser.add_argument("--tolerance", type=float, default=None, help="validation bound, relative to output scale")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: the saved login)")
    parser.add_argument("--tiny-vae", default=None, metavar="TAESD",
                        help="AutoencoderTiny folder or Hub repo id (e.g. madebyollin/taesd): also export "
                        "vae_decoder_tiny (+ vae_encoder_tiny), used with `diffrt generate --vae tiny`")
    parser.add_argument("--controlnet", action="append", default=None, metavar="CN",
                        help="ControlNetModel folder or Hub repo id, optionally NAME=CN (default name: the folder or "
                        "repo name); repeatable. Adds component controlnet_NAME and gives the UNet the residual "
                        "inputs it needs; used with `diffrt generate --controlnet NAME --control-image IMAGE`")
    parser.add_argument("--deep-cache", action="store_true",
                        help="DeepCache: the UNet also outputs the feature of one skip branch, and the package gains "
                        "unet_shallow, run between full UNet steps by `diffrt generate --deep-cache N` "
                        "(not with --controlnet)")
    parser.add_argument("--deep-cache-branch", type=int, default=None, metavar="B",
                        help="with --deep-cache: the skip branch, 0 (default, the shallowest: least work per "
                        "cached step) to the UNet's skip connections less one (11 for SD 1.x/2.x, 8 for SDXL)")
    parser.add_argument("--into", type=Path, default=None, metavar="PACKAGE",
                        help="add the --tiny-vae and/or --controlnet components to this existing package (its "
                        "precision and opset; --revision then applies to them) instead of exporting SOURCE; with "
                        "--controlnet, SOURCE may name the package's checkpoint (to export its UNet again with "
                        "residual inputs; default: the source its manifest records)")


def run(args: argparse.Namespace) -> int:
    if args.into is not None:  # `--tiny-vae TAESD / --controlnet CN --into PACKAGE`: components added in place
        from diffrt.export import add_controlnets, add_tiny_vae

        allowed_source = ("source",) if args.controlnet else ()
        extra = [f"`{name}`" for name in ("source", "output", "variant", "opset", "components")
                 if getattr(args, name) is not None and name not in allowed_source]
        extra += ["`--deep-cache`"] if args.deep_cache or args.deep_cache_branch is not None else []
        if args.tiny_vae is None and not args.controlnet:
            raise InputError("`--into PACKAGE` needs `--tiny-vae TAESD` or `--controlnet CN`: what to add to the "
                             "package")
        if extra:
            raise InputError(f"`--into PACKAGE` adds components in the package's own precision and opset; it takes "
                             f"no {', '.join(extra)}")
        if args.tiny_vae is not None:
            add_tiny_vae(args.into, args.tiny_vae, revision=args.revision, token=args.token,
                         overwrite=args.overwrite, validate=args.validate, tolerance=args.tolerance)
        if args.controlnet:
            add_controlnets(args.into, args.controlnet, source=args.source, revision=args.revision,
                            token=args.token, overwrite=args.overwrite, validate=args.validate,
                            tolerance=args.tolerance)
        if args.tensorrt:  # engines for the new components; existing engines are kept (their records match)
            from diffrt.export.tensorrt import build_engines

            build_engines(args.into)
        return 0
    if args.deep_cache_branch is not None and not args.deep_cache:
        raise InputError("`--deep-cache-branch` applies with `--deep-cache` only")
    if args.source is None or args.output is None:
        raise InputError("`source` and `output` are required (or `--tiny-vae TAESD` / `--controlnet CN` with "
                         "`--into PACKAGE` to add to an existing package)")
    if args.tensorrt:  # checked first: a long export must not end in "tensorrt is not installed"
        from diffrt.cli.build_engines import check_export

        check_export(args)
    from diffrt.export import export_pipeline

    export_pipeline(
        args.source, args.output, revision=args.revision, variant=args.variant, precision=args.precision,
        target=args.target, opset=args.opset, components=args.components, overwrite=args.overwrite,
        validate=args.validate, tolerance=args.tolerance, token=args.token, tiny_vae=args.tiny_vae,
        controlnets=args.controlnet, config_folder=args.config_folder, deep_cache=args.deep_cache,
        **({"deep_cache_branch": args.deep_cache_branch} if args.deep_cache_branch is not None else {}),
    )
    if args.tensorrt:
        from diffrt.export.tensorrt import build_engines

        build_engines(args.output, precision=args.precision)
    return 0
