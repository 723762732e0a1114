"""A bounded load test of `diffrt serve`: N requests from C concurrent clients over loopback, once per `--max-batch`
setting, each against a fresh server process; it stops by itself.

    python scripts/serve_load.py                                   # digits, 200 requests, 16 clients, 1 vs 16
    python scripts/serve_load.py --package sd15-small --size 64 --steps 10 --requests 48 --max-batch 1,8
    python scripts/serve_load.py --json load.json

Reports per setting: errors, p50 / p99 latency, throughput (images/s over the whole run), the mean images per
pipeline call (the server's /metrics), the server's RSS before and after (from /proc), and the speed-up of each
setting over the first. Every request has its own seed; all use the
same size, steps and guidance, so they can share UNet calls. Needs the `serve` extra (httpx for the clients).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "diffrt.cli", "--quiet", "serve", args.package, "--port", str(port),
               "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--max-queue", str(args.requests), "--max-steps", str(max(args.steps, 1)), "--timeout", "3600"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read() if process.stderr else ''}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not get ready in 10 minutes")


async def load(base_url: str, args: argparse.Namespace) -> tuple[list[float], list[str], float]:
    """(latencies of successful requests, error descriptions, wall seconds) of the whole run."""
    limit = asyncio.Semaphore(args.concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    body = {"prompt": args.prompt, "size": f"{args.size}x{args.size}", "steps": args.steps,
            "response_format": "b64_json"}

    async def one(client: httpx.AsyncClient, seed: int) -> None:
        async with limit:
            start = time.perf_counter()
            try:
                response = await client.post(f"{base_url}/v1/images/generations", json={**body, "seed": seed})
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")
                return
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, seed) for seed in range(args.requests)))
        return latencies, errors, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def mean_batch(base_url: str) -> float:
    """Images per pipeline call over the run, from the server's own /metrics."""
    values = {}
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(("diffrt_batch_size_sum", "diffrt_batch_size_count")):
            values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
    count = values.get("diffrt_batch_size_count", 0.0)
    return values.get("diffrt_batch_size_sum", 0.0) / count if count else float("nan")


def run_setting(args: argparse.Namespace, max_batch: int) -> dict[str, Any]:
    process, base_url = start_server(args, max_batch)
    try:
        rss_before = rss_mib(process.pid)
        latencies, errors, seconds = asyncio.run(load(base_url, args))
        rss_after = rss_mib(process.pid)
        batches = mean_batch(base_url)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    return {"max_batch": max_batch, "requests": args.requests, "errors": len(errors), "first_errors": errors[:3],
            "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
            "images_per_s": len(latencies) / seconds, "seconds": seconds, "rss_before_mib": rss_before,
            "rss_after_mib": rss_after, "mean_batch": batches, "server_exit_code": code}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="digits")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt", default="a handwritten seven")
    parser.add_argument("--max-batch", default="1,16", help="comma-separated settings to compare")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from diffrt.bench.report import machine_info

    machine = machine_info()
    print(f"{machine['cpu']} ({machine['usable_cpus']} usable CPUs; {' '.join(machine['cpu_flags'])}), load "
          f"average {machine['load_average']}")
    results = [run_setting(args, int(value)) for value in args.max_batch.split(",")]
    base = results[0]["images_per_s"]
    print(f"{args.package} {args.size}x{args.size}, {args.steps} steps, {args.requests} requests, "
          f"{args.concurrency} concurrent clients, batch wait {args.batch_wait_ms:g} ms")
    print(f"{'max-batch':>9} {'errors':>6} {'p50 s':>7} {'p99 s':>7} {'img/s':>7} {'speed-up':>8} "
          f"{'batch':>5} {'RSS MiB before/after':>21}")
    for row in results:
        print(f"{row['max_batch']:>9} {row['errors']:>6} {row['p50_s']:>7.2f} {row['p99_s']:>7.2f} "
              f"{row['images_per_s']:>7.1f} {row['images_per_s'] / base:>7.2f}x {row['mean_batch']:>5.1f} "
              f"{row['rss_before_mib']:>10.0f} / {row['rss_after_mib']:<9.0f}")
        for error in row["first_errors"]:
            print(f"  error: {error}")
    if args.json is not None:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "machine": machine,
                                                    "results": results},
                                        indent=2))
    return 1 if any(row["errors"] for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
