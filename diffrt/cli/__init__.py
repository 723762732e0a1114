"""The `diffrt` command: `diffrt export`, `diffrt info`, `diffrt generate`, ... one module of `diffrt.cli` each.

Adding a subcommand: a module `diffrt/cli/<name>.py` with `add_arguments(parser)` and `run(args) -> int`,
registered in SUBCOMMANDS; shared argument types live in `diffrt.cli.args`. Library modules never import this
package. Only the chosen subcommand's module is imported (so `diffrt info` and `diffrt --help` never import
torch); keep heavy imports inside `run` anyway, since `diffrt <name> --help` imports the module.

Exit codes: 0 success; 2 bad arguments (argparse's convention; also every ValueError-type diffrt error, such as
a missing source or an existing output), printed as one line; 1 a failure while working (ExportError, EngineError,
a file the system refused); 130 interrupted. No user mistake ends in a traceback: argument types (`cli/args.py`)
and each command's checks turn them into one line `diffrt COMMAND: error: ...` before any heavy work.
"""
from __future__ import annotations

import argparse
import importlib
import io
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
    "serve": Subcommand("serve model packages over HTTP (OpenAI Images and AUTOMATIC1111 APIs)", "diffrt.cli.serve"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): `diffrt export: error: ...`, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    """-v / -q, on the top-level parser (default False) and on every subcommand (default SUPPRESS, so a flag given
    before the subcommand is not reset by the subcommand's parser): `diffrt -q info X` == `diffrt info X -q`."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in `argv` gets its arguments (and its module imported)."""
    from diffrt import __version__

    parser = _Parser(prog="diffrt", description="Deploy diffusion models: export, inspect and run model packages.")
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    _add_verbosity(parser, False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            _add_verbosity(sub, argparse.SUPPRESS)
            command.function("add_arguments")(sub)
            sub.set_defaults(run=command.function("run"))
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `diffrt` console script; returns the exit code."""
    # Paths and prompts from argv may hold surrogate escapes (bytes that are not UTF-8): print them escaped rather
    # than fail while reporting a result.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser(argv).parse_known_args(argv)
    if unknown:  # argparse reports these as the top-level `diffrt`; they belong to the subcommand
        return _fail(args.command, f"unrecognized arguments: {' '.join(unknown)}", 2)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.run(args) or 0)
    except DiffrtError as error:
        code = 2 if isinstance(error, ValueError) else 1
        return _fail(args.command, str(error), code)
    except OSError as error:  # a file the system refused (permissions, disk full, ...): its message names the file
        return _fail(args.command, str(error), 1)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)


def _fail(command: str, message: str, code: int) -> int:
    """One line on stderr, `diffrt COMMAND: error: ...` (no traceback: the message says what to change)."""
    sys.stderr.write(f"diffrt {command}: error: {' '.join(message.split())}\n")
    return code
