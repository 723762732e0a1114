"""The `diffrt` command: `diffrt export`, `diffrt info`, `diffrt generate`, ... one entry of SUBCOMMANDS each.

Adding a subcommand: put `add_arguments(parser)` and `run(args) -> int` in a module and register it in
SUBCOMMANDS. Only the chosen subcommand's module is imported (so `diffrt info` and `diffrt --help` never import
torch); keep heavy imports inside `run` anyway, since `diffrt <name> --help` imports the module.

Exit codes: 0 success; 2 bad arguments (argparse's convention; also every ValueError-type diffrt error, such as
a missing source or an existing output), printed as one line; 1 a failure while working (ExportError, EngineError).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from diffrt.errors import DiffrtError, InputError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "diffrt.json"


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: `module` defines `add_arguments(parser) -> None` and `run(args) -> int` (names overridable)."""

    help: str
    module: str
    add_arguments: str = "add_arguments"
    run: str = "run"

    def function(self, attribute: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), getattr(self, attribute))


SUBCOMMANDS: dict[str, Subcommand] = {
    "export": Subcommand("export a diffusers checkpoint to a model package (ONNX)", __name__,
                         "add_export_arguments", "run_export"),
    "info": Subcommand("print a model package's manifest", __name__, "add_info_arguments", "run_info"),
    "generate": Subcommand("generate images from a model package", "diffrt.runtime.generate_cli"),
    "bench": Subcommand("benchmark a model package or preset against diffusers", "diffrt.bench.cli"),
    "build-engines": Subcommand("build TensorRT engines for a model package on this GPU", "diffrt.export.tensorrt_cli"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): `diffrt export: error: ...`, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in `argv` gets its arguments (and its module imported)."""
    parser = _Parser(prog="diffrt", description="Deploy diffusion models: export, inspect and run model packages.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            command.function("add_arguments")(sub)
            sub.set_defaults(run=command.function("run"))
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `diffrt` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.run(args) or 0)
    except DiffrtError as error:
        code = 2 if isinstance(error, ValueError) else 1
        sys.stderr.write(f"diffrt {args.command}: error: {error}\n")
        return code


# ----- diffrt export -----
def component_list(text: str) -> list[str]:
    """argparse type of `--components`: comma-separated names, at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated component names, got {text!r}")
    return names


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="diffusers folder, Hub repo id (owner/name) or single .safetensors "
                        "file (omitted with --into)")
    parser.add_argument("output", type=Path, nargs="?", help="model package folder to create (omitted with --into)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--variant", default=None, help="weight variant to read, e.g. fp16")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--target", default="onnxruntime", choices=("onnxruntime", "tensorrt", "cuda"),
                        help="onnxruntime: opset 23 with fused Attention, runs on every provider; tensorrt: opset "
                        "18; cuda: ONNX Runtime CUDA only, UNet/VAE built from its fused diffusion kernels "
                        "(MultiHeadAttention, NHWC GroupNorm; fastest with --provider cuda)")
    parser.add_argument("--tensorrt", action="store_true",
                        help="with --target tensorrt: then build TensorRT engines on this GPU (build-engines defaults)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: per target)")
    parser.add_argument("--components", type=component_list, default=None,
                        help="comma-separated subset of text_encoder,text_encoder_2,unet,vae_encoder,vae_decoder")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-validate", dest="validate", action="store_false",
                        help="skip the ONNX Runtime vs torch check")
    parser.add_argument("--tolerance", type=float, default=None, help="validation bound, relative to output scale")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: the saved login)")
    parser.add_argument("--tiny-vae", default=None, metavar="TAESD",
                        help="AutoencoderTiny folder or Hub repo id (e.g. madebyollin/taesd): also export "
                        "vae_decoder_tiny (+ vae_encoder_tiny), used with `diffrt generate --vae tiny`")
    parser.add_argument("--into", type=Path, default=None, metavar="PACKAGE",
                        help="add the --tiny-vae components to this existing package (its precision and opset; "
                        "--revision then applies to the tiny VAE) instead of exporting SOURCE")


def run_export(args: argparse.Namespace) -> int:
    if args.into is not None:  # `--tiny-vae TAESD --into PACKAGE`: only the tiny components, added in place
        from diffrt.export import add_tiny_vae

        extra = [f"`{name}`" for name in ("source", "output", "variant", "opset", "components")
                 if getattr(args, name) is not None]
        if args.tiny_vae is None:
            raise InputError("`--into PACKAGE` needs `--tiny-vae TAESD`: the tiny VAE to add to the package")
        if extra:
            raise InputError(f"`--into PACKAGE` adds the tiny VAE in the package's own precision and opset; it takes "
                             f"no {', '.join(extra)}")
        add_tiny_vae(args.into, args.tiny_vae, revision=args.revision, token=args.token, overwrite=args.overwrite,
                     validate=args.validate, tolerance=args.tolerance)
        if args.tensorrt:  # engines for the new components; existing engines are kept (their records match)
            from diffrt.export.tensorrt import build_engines

            build_engines(args.into)
        return 0
    if args.source is None or args.output is None:
        raise InputError("`source` and `output` are required (or `--tiny-vae TAESD --into PACKAGE` to add the tiny "
                         "VAE to an existing package)")
    if args.tensorrt:  # checked first: a long export must not end in "tensorrt is not installed"
        from diffrt.export.tensorrt_cli import check_export

        check_export(args)
    from diffrt.export import export_pipeline

    export_pipeline(
        args.source, args.output, revision=args.revision, variant=args.variant, precision=args.precision,
        target=args.target, opset=args.opset, components=args.components, overwrite=args.overwrite,
        validate=args.validate, tolerance=args.tolerance, token=args.token, tiny_vae=args.tiny_vae,
    )
    if args.tensorrt:
        from diffrt.export.tensorrt import build_engines

        build_engines(args.output, precision=args.precision)
    return 0


# ----- diffrt info -----
def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, help="model package folder")


def run_info(args: argparse.Namespace) -> int:
    sys.stdout.write(describe_package(args.package) + "\n")
    return 0


def read_manifest(package: Path) -> dict[str, Any]:
    """The manifest of a package folder; InputError naming the path when it is absent or not JSON."""
    path = Path(package) / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"`package` must be a model package folder with {MANIFEST_NAME}; got {str(package)!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON: {error}") from error


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _component_lines(name: str, entry: Mapping[str, Any]) -> list[str]:
    check = entry.get("validation") or {}
    diff = f"max abs diff {check['max_abs_diff']:.3g} (bound {check['tolerance']:.3g})" if check else "not validated"
    external = f" + {entry['external_data']}" if entry.get("external_data") else ""
    lines = [f"  {name}: {entry.get('file')}{external}, {entry.get('precision')}, {diff}"]
    for arrow, key in (("in ", "inputs"), ("out", "outputs")):
        lines += [f"      {arrow} {io['name']}: {io['dtype']} {_shape(io['shape'])}" for io in entry.get(key, [])]
    dims = ", ".join(f"{dim} {low}..{high}" for dim, (low, high) in entry.get("dims", {}).items())
    lines.append(f"      dims: {dims}")
    return lines


def describe_manifest(manifest: Mapping[str, Any]) -> str:
    """A manifest as aligned, human-readable text."""
    source = manifest.get("source", {})
    revision = f", revision {source['revision']}" if source.get("revision") else ""
    exporter = ", ".join(f"{k} {v}" for k, v in manifest.get("exporter", {}).items())
    lines = [
        f"pipeline   {manifest.get('pipeline')}",
        f"source     {source.get('id')} ({source.get('kind')}{revision})",
        f"precision  {manifest.get('precision')}",
        f"target     {manifest.get('target')} (opset {manifest.get('opset')})",
        f"exporter   {exporter}",
        f"created    {manifest.get('created')} ({manifest.get('format')} v{manifest.get('format_version')})",
        "components",
    ]
    for name, entry in manifest.get("components", {}).items():
        lines += _component_lines(name, entry)
    return "\n".join(lines)


def describe_engines(package: Path) -> str:
    """One line per TensorRT engine build record (`<component>/engines/<key>.json`) in the package."""
    lines = []
    for record in sorted(Path(package).glob("*/engines/*.json")):
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        data = data if isinstance(data, dict) else {}
        details = ", ".join(f"{k} {data[k]}" for k in ("gpu", "sm", "tensorrt", "precision") if k in data)
        missing = "" if record.with_suffix(".plan").is_file() else " (plan file missing)"
        suffix = f": {details}" if details else ""
        lines.append(f"  {record.parent.parent.name}/engines/{record.stem}{missing}{suffix}")
    return "engines\n" + "\n".join(lines) if lines else "engines    none"


def describe_package(package: Path) -> str:
    """What `diffrt info PACKAGE` prints: the manifest and any TensorRT engines."""
    return describe_manifest(read_manifest(package)) + "\n" + describe_engines(package)


if __name__ == "__main__":
    sys.exit(main())
