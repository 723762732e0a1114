#!/usr/bin/env python3
"""diffrt.rng.Generator("cuda") against torch.randn on a CUDA device: the seed document's example first.

    python scripts/gpu_rng_check.py --json rng.json

Each case draws twice from one seeded generator (the second draw checks the Philox offset bookkeeping) with
diffrt's default generator (H100/H200 geometry: 132 SMs) and with this GPU's own geometry, and records the max abs
difference to torch and whether it is within the tolerance tests/test_rng.py uses (float32 2e-5: the GPU's
__sincosf approximation; float16 8e-3: one half-precision step; float64 1e-12). Exit status 1 if any case fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffrt.rng import Generator, randn  # noqa: E402

# (label, seed, shape, dtype): the seed document's SDXL example (seed 123, 1024x1024 latents) first.
CASES = [
    ("seed document: SDXL 1024 latents", 123, (1, 4, 128, 128), "float32"),
    ("SDXL 1024 latents, float16", 123, (1, 4, 128, 128), "float16"),
    ("SD 1.5 512 latents", 0, (1, 4, 64, 64), "float32"),
    ("batch 4 SDXL latents", 42, (4, 4, 128, 128), "float32"),
    ("SD3/FLUX 16-channel latents", 7, (1, 16, 128, 128), "float32"),
    ("odd size", 2**40 + 3, (3, 5, 7), "float32"),
    ("float64", 5, (2, 4, 96, 96), "float64"),
]
TOLERANCE = {"float32": 2e-5, "float16": 8e-3, "float64": 1e-12}


def check(torch, label: str, seed: int, shape: tuple[int, ...], dtype: str, geometry: dict[str, int]) -> dict:
    ours = Generator("cuda", **geometry).manual_seed(seed)
    theirs = torch.Generator("cuda").manual_seed(seed)
    diffs = []
    for _ in range(2):
        reference = torch.randn(shape, generator=theirs, device="cuda", dtype=getattr(torch, dtype)).cpu().numpy()
        got = randn(shape, ours, dtype=np.dtype(dtype))
        diffs.append(float(np.max(np.abs(got.astype(np.float64) - reference.astype(np.float64)))))
    state_equal = ours.get_state().tobytes() == theirs.get_state().numpy().tobytes()
    return {"case": label, "seed": seed, "shape": list(shape), "dtype": dtype, "geometry": geometry or "default",
            "max_abs_diff": max(diffs), "tolerance": TOLERANCE[dtype], "state_equal": state_equal,
            "ok": max(diffs) <= TOLERANCE[dtype] and state_equal}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    props = torch.cuda.get_device_properties(0)
    native = {"multiprocessor_count": props.multi_processor_count,
              "max_threads_per_multiprocessor": props.max_threads_per_multi_processor}
    results = [check(torch, *case, geometry=geometry) for case in CASES for geometry in ({}, native)]
    record = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__, "cases": results,
              "all_ok": all(r["ok"] for r in results)}
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']:<36} {r['dtype']:<8} {str(r['geometry']):<60} "
              f"max |diff| {r['max_abs_diff']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if record["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
