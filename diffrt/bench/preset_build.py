"""`python -m diffrt.bench.preset_build PRESET`: build a benchmark preset (random weights) into the cache, in a
process of its own (torch, diffusers), after checking that it fits this machine (`diffrt.bench.preset_fit`).
The one stdout line is the built folder, or, with exit status `REFUSED`, why the preset cannot fit."""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import sys
from pathlib import Path
from typing import Iterator

from diffrt.bench.preset_fit import check_fits
from diffrt.bench.presets import (
    PRESETS,
    REFUSED,
    Preset,
    build_checkpoint,
    build_controlnet_package,
    build_package,
    build_tiny_vae,
    is_current,
    load_preset,
)
from diffrt.errors import InputError

logger = logging.getLogger(__name__)
LOCK_NAME = ".build.lock"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """One build of a preset at a time. Two benchmarks started together would each export the same preset (twice
    the memory and disk, the later rename replacing the earlier package): the second waits here, then finds the
    package built. The lock goes with its process, so a killed build leaves nothing to clear; a build that wrote
    nothing (a preset refused as too large for this machine) leaves no folder either."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("preset %s: another process is building it; waiting for that build", folder.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if all(entry == lock for entry in folder.iterdir()):
                lock.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a benchmark preset (random weights) into the cache.")
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--target", default="onnxruntime")
    parser.add_argument("--checkpoint-only", action="store_true", help="build the diffusers checkpoint only")
    parser.add_argument("--controlnets", type=int, default=0, metavar="N",
                        help="build the package with N random-weight ControlNets instead of the plain one")
    parser.add_argument("--deep-cache", action="store_true", help="export the package with DeepCache (branch 0)")
    parser.add_argument("--beside", action="store_true",
                        help="also check that diffrt and Diffusers fit in memory at once (an interleaved benchmark)")
    parser.add_argument("--tiny-vae-into", type=Path, default=None, metavar="PACKAGE",
                        help="add a random-weight tiny VAE to this package of the preset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    preset = load_preset(args.preset)
    with build_lock(preset.folder):
        return _build(args, preset)


def _build(args: argparse.Namespace, preset: Preset) -> int:
    package = preset.package(args.precision, args.target, args.deep_cache)
    if args.tiny_vae_into is None and (args.beside or not is_current(package)):
        try:
            check_fits(preset, args.precision, args.target, beside=args.beside)
        except InputError as error:
            print(str(error))  # the last stdout line: the parent raises it
            return REFUSED
    if args.tiny_vae_into is not None:
        from diffrt.export import add_tiny_vae

        add_tiny_vae(args.tiny_vae_into, build_tiny_vae(preset))
        print(args.tiny_vae_into)
        return 0
    if args.checkpoint_only:
        path = build_checkpoint(preset)
    elif args.controlnets > 0:
        path = build_controlnet_package(preset, args.controlnets, args.precision, args.target)
    else:
        path = build_package(preset, args.precision, args.target, args.deep_cache)
    print(path)  # the one line of stdout a caller reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
