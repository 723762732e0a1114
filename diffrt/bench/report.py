"""The benchmark record (JSON: machine, versions, config, every sample) and the table printed from it.

Per stage and side: min / median / p90 over the measured runs. Per-step stages are a run's stage time divided by
its number of steps. `host_per_step` is everything in the call outside the timed model and scheduler stages
(prompt and latent preparation, the CFG combine, post-processing), divided by the steps, so it means the same for
every side; diffrt also times its in-loop host work itself (`host_in_loop_per_step`), and `unaccounted` is the
part of its total that no stage timer covered. Ratios are other side's median / diffrt's median (> 1: diffrt is
faster), always from the same run. With several diffrt sides (`--provider cpu,openvino`), the first is the
reference of `ratios`, and `vs_diffusers` gives each diffrt side's median / Diffusers' median (< 1: diffrt faster),
the figure the CPU-speed goals are stated in. `quality` holds each side's image PSNR against the first diffrt
side's and against Diffusers' (same seed), so a faster precision is never reported without its error.
"""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffrt.package.files import write_json as write_file_json

SCHEMA = "diffrt-bench/1"
TIMED = ("text_encoder", "unet", "scheduler", "host", "vae_decode")
#: stages only some runs have (`--controlnet N`)
OPTIONAL_TIMED = ("controlnet",)
#: model stages (everything else in a call is host work)
MODELS = ("text_encoder", "controlnet", "unet", "scheduler", "vae_decode")
METRICS = {  # key -> (table label, per step)
    "text_encoder": ("text encoding", False),
    "unet_per_step": ("UNet / step", True),
    "scheduler_per_step": ("scheduler / step", True),
    "host_per_step": ("CFG + host / step", True),
    "vae_decode": ("VAE decode", False),
    "total": ("total", False),
}
#: metrics of the optional stages, reported (and shown) for runs that have them
OPTIONAL_METRICS = {"controlnet_per_step": ("ControlNet / step", True)}
LIBRARIES = ("diffrt", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "diffusers", "transformers",
             "optimum", "tokenizers")


def derived(sample: Mapping[str, Any]) -> dict[str, float]:
    """The reported metrics of one run, from its total, its stage times and its step count."""
    stages, total = sample["stages"], float(sample["total"])
    steps = max(len(sample.get("steps") or []), 1)
    timed_models = sum(float(stages.get(k, 0.0)) for k in MODELS)
    out = {
        "text_encoder": float(stages.get("text_encoder", 0.0)),
        "controlnet_per_step": float(stages.get("controlnet", 0.0)) / steps,
        "unet_per_step": float(stages.get("unet", 0.0)) / steps,
        "scheduler_per_step": float(stages.get("scheduler", 0.0)) / steps,
        "host_per_step": (total - timed_models) / steps,
        "host_in_loop_per_step": float(stages.get("host", 0.0)) / steps,
        "vae_decode": float(stages.get("vae_decode", 0.0)),
        "total": total,
    }
    out["unaccounted"] = total - sum(float(stages.get(k, 0.0)) for k in TIMED + OPTIONAL_TIMED)
    # GPU engines: the host<->device copies inside each UNet call (latents and timestep in, prediction out).
    out["transfer_per_step"] = sum(float(step.get("unet_transfer", 0.0)) for step in sample.get("steps") or []) / steps
    # Everything outside the engines (scheduler, CFG combine, conversions, Python), as a share of the total.
    engines = sum(float(stages.get(k, 0.0)) for k in ("text_encoder", "controlnet", "unet", "vae_decode"))
    out["host_share"] = (total - engines) / total if total > 0 else 0.0
    return out


def stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "median": float(np.median(array)), "p90": float(np.percentile(array, 90)),
            "n": int(array.size)}


def summarize(samples: list[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    rows = [derived(s) for s in samples]
    return {key: stats([row[key] for row in rows]) for key in rows[0]}


# The instruction sets that decide which CPU paths exist (fp32 AVX2 vs AVX-512, bf16, int8 VNNI, AMX).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                present = set(line.split(":", 1)[1].split())
                flags = [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": _gpus(),
        "versions": {},
    }
    for name in LIBRARIES:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return info


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def psnr(image: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf when equal): uint8 images (peak 255), or float ones in [0, 1] (peak 1)."""
    diff = image.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff * diff))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(peak**2 / mse))


def image_quality(folder: Path, sides: list[str]) -> dict[str, dict[str, Any]]:
    """Each side's PSNR (dB) against the first side's image and against Diffusers' (same seed); None if missing."""
    images = {side: np.load(folder / f"{side}.npy") for side in sides if (folder / f"{side}.npy").is_file()}
    references = {"first": sides[0], "diffusers": "diffusers" if "diffusers" in sides else None}
    out: dict[str, dict[str, Any]] = {}
    for side in sides:
        row: dict[str, float | str | None] = {}
        for label, ref in references.items():
            if ref is None or ref == side:
                continue
            ok = side in images and ref in images and images[side].shape == images[ref].shape
            value = psnr(images[side], images[ref]) if ok else None
            # JSON has no infinity: equal images are recorded as the string "inf".
            row[f"psnr_vs_{label}_db"] = "inf" if value == float("inf") else value
        out[side] = row
    return out


def denoiser_work(config: Any) -> tuple[float, str]:
    """(FLOPs of one denoiser call, "unet" or "transformer") for the run's size and batch. Classifier-free guidance
    doubles the rows of UNet (unless guidance-distilled: `time_cond_proj_dim`) and SD3 calls; FLUX.1's guidance is
    distilled (an embedding, or none for schnell), one row per image."""
    from diffrt.bench.flops import denoiser_flops
    from diffrt.package.reader import ModelPackage

    package = ModelPackage.open(config.package)
    name = "transformer" if package.has("transformer") else "unet"
    denoiser_config = package.component(name).config if name == "transformer" else package.unet_config
    doubled = config.guidance > 1.0 and denoiser_config.get("time_cond_proj_dim") is None
    if "Flux" in str(denoiser_config.get("_class_name", "")):
        doubled = False
    rows = config.batch * (2 if doubled else 1)
    return denoiser_flops(name, denoiser_config, config.height // 8, config.width // 8, batch=rows), name


def build_record(opts: Any, config: Any, raw: dict[str, Any], preset: str | None,
                 sides_config: dict[str, Any] | None = None,
                 quality: dict[str, Any] | None = None) -> dict[str, Any]:
    flops, denoiser = denoiser_work(config)
    sides: dict[str, Any] = {}
    failed = {side: data["error"] for side, data in raw.items() if "error" in data}
    for side, data in raw.items():
        if side in failed:
            continue
        summary = summarize(data["samples"])
        peak = max(s.get("peak_rss_mb", 0.0) for s in data["warmup"] + data["samples"])
        device = [s["peak_device_mb"] for s in data["warmup"] + data["samples"] if "peak_device_mb" in s]
        sides[side] = {**data, "summary": summary, "peak_rss_mb": peak,
                       "peak_device_mb": max(device) if device else None,
                       "unet_tflops": flops / summary["unet_per_step"]["median"] / 1e12}
    first = next(iter(sides))
    ratios = {side: _ratios(sides[side], sides[first]) for side in sides if side != first}
    vs_diffusers = ({side: _ratios(sides[side], sides["diffusers"]) for side in sides if side.startswith("diffrt")}
                    if "diffusers" in sides else {})
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": machine_info(), "preset": preset, "options": asdict(opts), "config": asdict(config),
            "sides_config": sides_config or {}, "interleaved": len(sides) > 1 and not opts.one_at_a_time,
            "denoiser": denoiser,
            "unet_flops_per_step": flops,
            "sides": sides, "reference": first, "ratios": ratios, "vs_diffusers": vs_diffusers,
            "quality": quality or {}, "failed": failed}


def _ratios(side: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
    """side median / reference median per reported metric."""
    mine, theirs = side["summary"], reference["summary"]
    return {key: mine[key]["median"] / theirs[key]["median"] for key in (*METRICS, *OPTIONAL_METRICS)
            if theirs[key]["median"] > 0}


def _cell(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.2f}{unit}"


def ran_one_at_a_time(record: Mapping[str, Any]) -> bool:
    """Whether the record's sides ran one after the other (`--one-at-a-time`) rather than interleaved."""
    return bool(record.get("options", {}).get("one_at_a_time"))


def format_table(record: Mapping[str, Any]) -> str:
    """A fixed-width table: the reference side's min/median/p90, then each other side's median and ratio; with
    Diffusers compared and several diffrt sides, a second table of each diffrt side relative to Diffusers."""
    sides, cfg = record["sides"], record["config"]
    first = record.get("reference", "diffrt")
    others = [s for s in sides if s != first]
    head = ["stage", "min", "median", "p90"] + [h for s in others for h in (f"{s} median", "ratio")]
    rows = [head]
    for key, (label, _) in _shown(record).items():
        mine = sides[first]["summary"][key]
        row = [label, _cell(mine["min"]), _cell(mine["median"]), _cell(mine["p90"])]
        for side in others:
            ratio = record["ratios"][side].get(key)
            row += [_cell(sides[side]["summary"][key]["median"]), "-" if ratio is None else f"{ratio:.2f}x"]
        rows.append(row)
    rows += _extra_rows(record, first, others)
    providers = ", ".join(c["provider"] for name, c in record.get("sides_config", {}).items()
                          if name.startswith("diffrt"))
    control = f"ControlNets {', '.join(cfg['controlnets'])}, " if cfg.get("controlnets") else ""
    title = (f"{record['preset'] or cfg['package']}: {cfg['height']}x{cfg['width']}, {cfg['steps']} steps, "
             f"guidance {cfg['guidance']}, batch {cfg['batch']}, {providers or cfg['provider']}, {control}"
             f"{cfg['threads']} threads, {sides[first]['summary']['total']['n']} measured run(s); "
             f"first column: {first}")
    how = "one side after the other" if ran_one_at_a_time(record) else "interleaved"
    note = f"ratio = that side's median / {first}'s median (> 1: {first} faster), {how} in the same run"
    machine = record.get("machine", {})
    hardware = f"machine: {machine.get('cpu')} ({', '.join(machine.get('cpu_flags') or []) or 'no AVX2'})"
    hardware += "".join(f"; GPU {gpu}" for gpu in machine.get("gpu") or [])
    parts = [title, hardware, _layout(rows)] + ([note] if others else [])
    parts += [f"FAILED {side}: {error}" for side, error in record.get("failed", {}).items()]
    if len(record.get("vs_diffusers", {})) > 1:
        parts += ["", "each diffrt side relative to Diffusers (its median / Diffusers' median; < 1: faster)",
                  _layout(_diffusers_rows(record))]
    return "\n".join(parts)


def _shown(record: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """The table's metrics: an optional stage's row (ControlNet / step) only when a side ran that stage, after the
    text encoder; the per-step denoiser row is "transformer / step" for SD3 / FLUX."""
    ran = {key: value for key, value in OPTIONAL_METRICS.items()
           if any(side["summary"].get(key, {}).get("median", 0.0) > 0 for side in record["sides"].values())}
    first, *rest = METRICS.items()
    shown = dict([first, *ran.items(), *rest])
    if record.get("denoiser") == "transformer":
        shown["unet_per_step"] = ("transformer / step", True)
    return shown


def denoiser_label(record: Mapping[str, Any]) -> str:
    return "transformer" if record.get("denoiser") == "transformer" else "UNet"


def _layout(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _diffusers_rows(record: Mapping[str, Any]) -> list[list[str]]:
    names = list(record["vs_diffusers"])
    rows = [["stage"] + names]
    for key, (label, _) in _shown(record).items():
        rows.append([label] + [f"{record['vs_diffusers'][n].get(key, float('nan')):.2f}" for n in names])
    for label, key in (("PSNR vs first side", "psnr_vs_first_db"), ("PSNR vs Diffusers", "psnr_vs_diffusers_db")):
        cells = [record.get("quality", {}).get(n, {}).get(key) for n in names]
        rows.append([label] + [_db(c) for c in cells])
    return rows


def cold_overhead(side: Mapping[str, Any]) -> float:
    """Cold start less the image's own compute: package load + (first image - the median warm image)."""
    cold = side["cold_start"]
    return cold["load_s"] + max(cold["first_image_s"] - side["summary"]["total"]["median"], 0.0)


def _extra_rows(record: Mapping[str, Any], first: str, others: list[str]) -> list[list[str]]:
    sides = record["sides"]
    model = denoiser_label(record)

    def row(label: str, get: Any, unit: str = "s") -> list[str]:
        mine = get(sides[first])
        cells = [label, "", _cell(mine, unit), ""]
        for side in others:
            theirs = get(sides[side])
            ratio = f"{theirs / mine:.2f}x" if mine and theirs is not None and unit == "s" else ""
            cells += [_cell(theirs, unit), ratio]
        return cells

    quality = record.get("quality", {})
    rows = [
        row("host share", lambda s: 100 * s["summary"]["host_share"]["median"], " %"),
        row(f"copies in {model} / step", lambda s: s["summary"]["transfer_per_step"]["median"] or None),
        row("cold: load", lambda s: s["cold_start"]["load_s"]),
        row("cold: first image", lambda s: s["cold_start"]["first_image_s"]),
        row("cold: overhead", cold_overhead),
        row("peak RSS", lambda s: s["peak_rss_mb"] / 1024, " GiB"),
        row("peak device mem", lambda s: None if s["peak_device_mb"] is None else s["peak_device_mb"] / 1024, " GiB"),
        row(f"{model} TFLOP/s", lambda s: s["unet_tflops"], ""),
    ]
    rows.append(["PSNR vs Diffusers", "", _db(quality.get(first, {}).get("psnr_vs_diffusers_db")), ""]
                + [c for side in others for c in (_db(quality.get(side, {}).get("psnr_vs_diffusers_db")), "")])
    return rows


def _db(value: float | str | None) -> str:
    return "-" if value is None else "identical" if value == "inf" else f"{value:.1f} dB"


def write_json(path: str | Path, record: Mapping[str, Any]) -> None:
    """The record, atomically (`diffrt.package.files.write_json`)."""
    write_file_json(Path(path), record, indent=1)
