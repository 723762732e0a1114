#!/usr/bin/env python3
"""Export a diffusers checkpoint to a model package; the same as `diffrt export`.

    python scripts/export.py SOURCE OUTPUT [--precision fp16] [--target tensorrt] [--components unet,vae_decoder]

SOURCE is a diffusers folder, a Hub repo id (owner/name) or a single .safetensors file; see `--help`.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Run from a source checkout without installing: the repository root holds the `diffrt` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffrt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
