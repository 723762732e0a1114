#!/usr/bin/env python3
"""Latency benchmark; the same as `diffrt bench`.

    python scripts/benchmark.py sd15 --steps 20 --runs 3 --compare diffusers --json sd15.json

PACKAGE_OR_PRESET is a model package folder or a preset built on first use (tiny, sd15, sd21, sdxl; for SD3 / FLUX
tiny-sd3, tiny-flux, sd35m-6blocks, and sd35m / flux-schnell, refused here when they do not fit); see `--help`
and docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Run from a source checkout without installing: the repository root holds the `diffrt` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffrt.cli import bench as cli  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return cli.run(args)
    except DiffrtError as error:
        sys.stderr.write(f"benchmark.py: error: {error}\n")
        return 2 if isinstance(error, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
