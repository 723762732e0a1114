#!/usr/bin/env python3
"""Peak memory, time and sizes of exporting SD 3.5 medium's transformer at its real size (docs/benchmarks.md).

    python scripts/export_memory.py [--work /tmp/diffrt-export-memory] [--precision bf16] [--no-validate]
                                    [--config sd35-medium|tiny] [--num-layers N] [--keep] [--json out.json]

1. Builds a random-weight checkpoint from the published config of stabilityai/stable-diffusion-3.5-medium's
   transformer (~2.5B parameters): a diffusers folder with model_index.json (StableDiffusion3Pipeline, listing
   only `transformer` and `scheduler`), `transformer/` saved in bfloat16 by Diffusers' `SD3Transformer2DModel`,
   `scheduler/` FlowMatchEulerDiscreteScheduler(shift=3.0). The model is built under `torch.device("meta")` and
   materialized directly in bfloat16 (no float32 copy), in a child process of its own.
2. Runs `diffrt.export.export_pipeline(folder, out, components=["transformer"], precision=...)` in another child
   process, sampling its VmRSS twice a second (every log line of the export carries the RSS at that moment, so a
   run that does not fit shows how far it got), and reads its peak from `os.wait4`'s rusage (ru_maxrss).
   A watchdog kills the export when the machine's MemAvailable falls below `--min-available-mib` (the machine
   is shared; the OOM killer might otherwise pick another process) and the report says so.
3. Prints (and with --json writes) a JSON report: CPU flags, machine memory, weights bytes and parameter count,
   build and export peak RSS and wall time, package size, how the export ended. The checkpoint and the package
   are deleted afterwards unless --keep. `--config tiny` runs the same steps on a two-layer model (a smoke test);
   `--num-layers N` keeps the real widths with fewer blocks (dual attention in the first min(N, 13)): a scaled-down
   run, e.g. to see validation's or fp32's share at a size whose files fit the disk.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Run from a source checkout without installing: the repository root holds the `diffrt` package.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35_MEDIUM = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "sample_size": 128,
}
TINY = {**SD35_MEDIUM, "attention_head_dim": 8, "caption_projection_dim": 32, "dual_attention_layers": [0],
        "joint_attention_dim": 32, "num_attention_heads": 4, "num_layers": 2, "pooled_projection_dim": 16,
        "pos_embed_max_size": 32, "sample_size": 16}
CONFIGS = {"sd35-medium": SD35_MEDIUM, "tiny": TINY}


def rss_mib(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB; (0, 0) once it is gone."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return round(values["VmRSS"], 1), round(values["VmHWM"], 1)


def anon_mib(pid: int | str = "self") -> float:
    """RssAnon of a process in MiB: its resident memory without the file pages it maps (safetensors reads the
    checkpoint through a mapping, whose page-cache pages count in VmRSS but are reclaimable); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "RssAnon":
                return round(int(rest.split()[0]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return 0.0


def meminfo_mib(key: str) -> float | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) / 1024
    return None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# --- child: build the checkpoint ---------------------------------------------------------------------------------

def model_config(name: str, num_layers: int | None) -> dict[str, Any]:
    config = dict(CONFIGS[name])
    if num_layers is not None:
        config["num_layers"] = num_layers
        config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < num_layers]
    return config


def build(folder: Path, config: dict[str, Any]) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    # Materialize in bfloat16 and fill each tensor in place: the float32 model (10 GB) never exists.
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("bias"):
                tensor.zero_()
            elif tensor.dim() == 1:  # norm scales
                tensor.fill_(1.0)
            else:  # 1/sqrt(fan_in): activations stay in range through the 24 blocks
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
                tensor.normal_(0.0, fan_in ** -0.5)
    # The position table is a sin/cos buffer, not a weight: recompute it as Diffusers' init does.
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pos = model.pos_embed
    if getattr(pos, "pos_embed", None) is not None:
        table = get_2d_sincos_pos_embed(pos.pos_embed.shape[-1], int(pos.pos_embed_max_size), base_size=pos.base_size,
                                        interpolation_scale=pos.interpolation_scale, output_type="pt")
        pos.pos_embed.copy_(table.float().unsqueeze(0).to(pos.pos_embed.dtype))
    folder.mkdir(parents=True)
    model.save_pretrained(folder / "transformer", max_shard_size="20GB")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.31.0",
             "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": parameters, "peak_rss_mib": rss_mib()[1]}))


# --- child: the export -------------------------------------------------------------------------------------------

class _RssFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rss = "rss %.0f MiB (peak %.0f)" % rss_mib()
        return True


def export(folder: Path, out: Path, precision: str, validate: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RssFilter())
    handler.setFormatter(logging.Formatter("%(relativeCreated)8.0f ms  %(rss)s  %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    from diffrt.export import export_pipeline

    export_pipeline(folder, out, components=["transformer"], precision=precision, validate=validate)


# --- parent ------------------------------------------------------------------------------------------------------

def run_child(args: list[str], min_available_mib: float, log: Path) -> dict[str, Any]:
    """Run this script as a child; its peak RSS (rusage and sampled), wall time, exit status, watchdog kill."""
    samples: list[tuple[float, float]] = []
    anonymous: list[tuple[float, float]] = []
    killed: dict[str, Any] = {}
    start = time.perf_counter()
    with open(log, "w") as stream:
        child = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=stream, text=True)
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                samples.append((time.perf_counter() - start, rss_mib(child.pid)[0]))
                anonymous.append((samples[-1][0], anon_mib(child.pid)))
                available = meminfo_mib("MemAvailable")
                if available is not None and available < min_available_mib and not killed:
                    killed.update(at_s=round(time.perf_counter() - start, 1), available_mib=round(available),
                                  rss_mib=samples[-1][1])
                    child.send_signal(signal.SIGKILL)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert child.stdout is not None
        stdout = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        watcher.join()
    seconds = time.perf_counter() - start
    peak_at = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)
    anon_at = max(anonymous, key=lambda s: s[1]) if anonymous else (0.0, 0.0)
    return {"rc": child.returncode, "seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "peak_sampled_rss_mib": peak_at[1], "peak_sampled_at_s": round(peak_at[0], 1),
            "peak_sampled_anon_mib": anon_at[1], "peak_anon_at_s": round(anon_at[0], 1),
            "watchdog_kill": killed or None, "stdout": stdout.strip(), "log": str(log)}


def machine() -> dict[str, Any]:
    flags = ""
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = line.partition(":")[2].strip()
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags.split()],
            "all_flags": flags, "mem_total_mib": round(meminfo_mib("MemTotal") or 0),
            "mem_available_mib_at_start": round(meminfo_mib("MemAvailable") or 0),
            "python": sys.version.split()[0]}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "onnx", "onnxscript", "onnx-ir", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/diffrt-export-memory"))
    parser.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument("--config", default="sd35-medium", choices=sorted(CONFIGS))
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the package")
    parser.add_argument("--min-available-mib", type=float, default=1024)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--stage", choices=("build", "export"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint, package = args.work / "checkpoint", args.work / "package"
    if args.stage == "build":
        build(checkpoint, model_config(args.config, args.num_layers))
        return 0
    if args.stage == "export":
        export(checkpoint, package, args.precision, not args.no_validate)
        return 0

    report: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                              "versions": versions(), "config": args.config, "precision": args.precision,
                              "validate": not args.no_validate}
    print(f"# {report['machine']['cpu']}, {report['machine']['cores']} cores\nflags\t\t: "
          f"{report['machine']['all_flags']}", file=sys.stderr)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    common = ["--work", str(args.work), "--config", args.config, "--precision", args.precision]
    if args.num_layers is not None:
        common += ["--num-layers", str(args.num_layers)]
        report["num_layers"] = args.num_layers
    try:
        built = run_child(["--stage", "build", *common], args.min_available_mib, args.work / "build.log")
        report["build"] = built
        if built["rc"] != 0:
            raise SystemExit(f"the checkpoint build failed (rc {built['rc']}); see {built['log']}")
        report["parameters"] = json.loads(built["stdout"].splitlines()[-1])["parameters"]
        report["weights_bytes"] = folder_bytes(checkpoint / "transformer")
        extra = ["--no-validate"] if args.no_validate else []
        exported = run_child(["--stage", "export", *common, *extra], args.min_available_mib, args.work / "export.log")
        report["export"] = exported
        report["export"]["log_tail"] = (args.work / "export.log").read_text().splitlines()[-40:]
        report["package_bytes"] = folder_bytes(package)
        report["package_files"] = sorted(str(f.relative_to(package)) for f in package.rglob("*") if f.is_file())
        peak = exported["peak_rss_mib"] * 2**20
        report["peak_rss_per_weight_byte"] = round(peak / report["weights_bytes"], 3)
        report["peak_rss_per_parameter"] = round(peak / report["parameters"], 3)
    finally:
        report["children_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if not args.keep:
            for path in (checkpoint, package):
                shutil.rmtree(path, ignore_errors=True)
            for leftover in args.work.glob("*.tmp*"):  # a killed export's temp folder beside the package
                shutil.rmtree(leftover, ignore_errors=True)
        text = json.dumps(report, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
    return 0 if report.get("export", {}).get("rc") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
