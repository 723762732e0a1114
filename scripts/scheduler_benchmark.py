"""Time ``step()`` of every registered diffrt scheduler against its Diffusers counterpart on the same input.

    python scripts/scheduler_benchmark.py                 # table
    python scripts/scheduler_benchmark.py --json out.json # also write the numbers

Both sides run a full loop over the same latent (default (2, 4, 128, 128) float32, an SDXL batch of two) with a
fixed model output; each ``step`` call is timed on its own, and the median over all steps of all repeats is
reported. Stochastic schedulers draw their noise inside ``step`` on both sides (torch / diffrt generators).
Needs torch and diffusers (the ``export`` and ``test`` extras); diffrt itself stays NumPy-only.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def time_loop(scheduler: Any, latent: Any, model_output: Any, generator: Callable[[], Any] | None,
              repeats: int, steps: int, to_array: Callable[[Any], Any]) -> list[float]:
    """Per-step wall times (seconds) of ``repeats`` full loops of ``steps`` steps."""
    times = []
    for _ in range(repeats):
        scheduler.set_timesteps(steps)
        kwargs = {"generator": generator()} if generator and _takes_generator(scheduler) else {}
        sample = to_array(latent)
        for t in scheduler.timesteps:
            if hasattr(scheduler, "scale_model_input"):  # Diffusers' flow-matching class has none
                scheduler.scale_model_input(sample, t)
            start = time.perf_counter()
            sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
            times.append(time.perf_counter() - start)
    return times


def _takes_generator(scheduler: Any) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def bench_one(name: str, shape: tuple[int, ...], steps: int, repeats: int) -> dict[str, Any]:
    import diffusers
    import torch

    from diffrt.rng import Generator
    from diffrt.schedulers import get_scheduler_class

    rng = np.random.default_rng(0)
    latent = rng.standard_normal(shape, dtype=np.float32)
    model_output = np.tanh(rng.standard_normal(shape, dtype=np.float32))
    ours = get_scheduler_class(name).from_config(SD_CONFIG)
    ref = getattr(diffusers, name).from_config(SD_CONFIG)
    ours_times = time_loop(ours, latent, model_output, lambda: Generator().manual_seed(0), repeats, steps,
                           lambda a: a.copy())
    ref_out = torch.from_numpy(model_output)
    ref_times = time_loop(ref, latent, ref_out, lambda: torch.Generator("cpu").manual_seed(0), repeats, steps,
                          lambda a: torch.from_numpy(a.copy()))
    ours_ms, ref_ms = statistics.median(ours_times) * 1e3, statistics.median(ref_times) * 1e3
    return {"scheduler": name, "diffrt_ms": ours_ms, "diffusers_ms": ref_ms, "ratio": ours_ms / ref_ms}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 4, 128, 128])
    parser.add_argument("--steps", type=int, default=20, help="steps per loop")
    parser.add_argument("--repeats", type=int, default=3, help="loops per scheduler and side")
    parser.add_argument("--only", nargs="*", help="scheduler class names (default: every registered one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads; 1 (default) compares like with like, as NumPy's elementwise "
                             "ops are single-threaded; 0 keeps torch's default")
    args = parser.parse_args(argv)
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    import torch

    from diffrt.schedulers import registered_names

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    names = args.only or registered_names()
    rows = [bench_one(n, tuple(args.shape), args.steps, args.repeats) for n in names]
    print(f"step() median per call, latent {tuple(args.shape)} float32, {args.steps} steps x {args.repeats}; "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, NumPy {np.__version__}")
    print(f"{'scheduler':34s} {'diffrt ms':>10s} {'diffusers ms':>13s} {'ratio':>7s}")
    for row in rows:
        print(f"{row['scheduler']:34s} {row['diffrt_ms']:10.3f} {row['diffusers_ms']:13.3f} {row['ratio']:7.2f}")
    if args.json:
        meta = {"shape": args.shape, "steps": args.steps, "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
