"""The `diffrt` command: `diffrt export`, `diffrt info`, `diffrt generate`, ... one module of `diffrt.cli` each.

Adding a subcommand: a module `diffrt/cli/<name>.py` with `add_arguments(parser)` and `run(args) -> int`,
registered in SUBCOMMANDS; shared argument types live in `diffrt.cli.args`. Library modules never import this
package. Only the chosen subcommand's module is imported (so `diffrt info` and `diffrt --help` never import
torch); keep heavy imports inside `run` anyway, since `diffrt <name> --help` imports the module.

Exit codes: 0 success; 2 bad arguments (argparse's convention; also every ValueError-type diffrt error, such as
a missing source or an existing output), printed as one line; 1 a failure while working (ExportError, EngineError).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

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
    "export": Subcommand("export a diffusers checkpoint to a model package (ONNX)", "diffrt.cli.export"),
    "info": Subcommand("print a model package's manifest", "diffrt.cli.info"),
    "generate": Subcommand("generate images from a model package", "diffrt.cli.generate"),
    "bench": Subcommand("benchmark a model package or preset against diffusers", "diffrt.cli.bench"),
    "build-engines": Subcommand("build TensorRT engines for a model package on this GPU", "diffrt.cli.build_engines"),
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
