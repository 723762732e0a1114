"""`diffrt bench`: the record it writes, its stage accounting, its FLOP count and its errors.

The end-to-end tests run `scripts/benchmark.py` on the `tiny` preset (built once into a pytest cache folder, or
`$DIFFRT_CACHE`; keyed by the preset's spec hash, so a stale build is never reused), two measured runs: diffrt
alone, and (slow: the Diffusers process imports torch) interleaved with Diffusers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffrt.bench.flops import unet_flops
from diffrt.bench.presets import load_preset
from diffrt.bench.report import METRICS, OPTIONAL_METRICS, SCHEMA, TIMED, psnr
from diffrt.bench.runner import BenchOptions, check_options, resolve, side_names, variants
from diffrt.errors import InputError, PackageError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
RUNS = 2
STEPS = 8


def _bench(args: list[str], cache: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFRT_CACHE=str(cache))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def preset_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where presets are cached for tests: $DIFFRT_CACHE, else a pytest cache folder kept between sessions (the
    tiny preset's export takes about a minute), else (cache plugin off) a temporary folder."""
    if os.environ.get("DIFFRT_CACHE"):
        return Path(os.environ["DIFFRT_CACHE"])
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("diffrt-cache") if cache is not None else tmp_path_factory.mktemp("diffrt-cache")


def _run_tiny(cache: Path, out: Path, *extra: str) -> tuple[dict, str]:
    result = _bench(["tiny", "--runs", str(RUNS), "--warmup", "1", "--steps", str(STEPS), "--height", "128",
                     "--width", "128", "--json", str(out), *extra], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not Path(f"{out}.partial").exists()  # the journal is removed once the record is written
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def tiny_run(preset_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """diffrt alone: seconds once the preset is cached."""
    return _run_tiny(preset_cache, tmp_path_factory.mktemp("bench") / "tiny.json")


@pytest.fixture(scope="module")
def compared_run(preset_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """diffrt and Diffusers interleaved (the Diffusers process imports torch: tens of seconds on a busy machine)."""
    return _run_tiny(preset_cache, tmp_path_factory.mktemp("bench") / "tiny_vs_diffusers.json",
                     "--compare", "diffusers")


def test_record_has_machine_versions_config_and_every_sample(tiny_run):
    record, _ = tiny_run
    assert record["schema"] == SCHEMA and record["preset"] == "tiny" and record["interleaved"] is False
    machine = record["machine"]
    assert machine["cpu"] and machine["usable_cpus"] >= 1
    assert {"numpy", "onnxruntime"} <= set(machine["versions"])
    config = record["config"]
    assert (config["height"], config["width"], config["steps"], config["batch"]) == (128, 128, STEPS, 1)
    assert set(record["sides"]) == {"diffrt"} and record["ratios"] == {}
    for side in record["sides"].values():
        assert len(side["samples"]) == RUNS and len(side["warmup"]) == 1
        assert side["info"]["threads"] == config["threads"]
        assert side["cold_start"]["load_s"] > 0 and side["cold_start"]["first_image_s"] > 0
        assert side["peak_rss_mb"] > 0 and side["unet_tflops"] > 0
        for key in METRICS:
            summary = side["summary"][key]
            assert summary["n"] == RUNS and 0 < summary["min"] <= summary["median"] <= summary["p90"]


def test_every_stage_is_positive_and_stages_add_up_to_the_total(tiny_run):
    record, _ = tiny_run
    for sample in record["sides"]["diffrt"]["samples"]:
        stages = sample["stages"]
        assert all(stages[name] > 0 for name in TIMED), stages
        assert sum(stages[name] for name in TIMED) == pytest.approx(sample["total"], rel=0.05)
        # PNDM (the SD 1.5 scheduler) calls the UNet steps + 1 times; each call is one per-step sample.
        assert len(sample["steps"]) == STEPS + 1
        assert sum(step["unet"] for step in sample["steps"]) == pytest.approx(stages["unet"], rel=1e-6)


def test_diffrt_side_never_imports_torch(tiny_run):
    record, _ = tiny_run
    assert record["sides"]["diffrt"]["info"]["torch_imported"] is False


@pytest.mark.slow
def test_compare_diffusers_runs_interleaved_with_every_stage_and_ratio(compared_run):
    record, stdout = compared_run
    # Same weights, seed and scheduler: the images agree to within uint8 rounding of ~1e-5 differences.
    quality = record["quality"]["diffrt"]["psnr_vs_diffusers_db"]
    assert quality == "inf" or quality >= 45, quality
    assert record["interleaved"] is True and set(record["sides"]) == {"diffrt", "diffusers"}
    assert {"torch", "diffusers"} <= set(record["machine"]["versions"])
    rounds = {name: [s["round"] for s in side["warmup"] + side["samples"]] for name, side in record["sides"].items()}
    assert rounds["diffrt"] == rounds["diffusers"] == list(range(RUNS + 1))
    finished = {name: [s["finished"] for s in side["samples"]] for name, side in record["sides"].items()}
    assert min(finished["diffusers"]) < max(finished["diffrt"])  # interleaved: neither side ran all its runs first
    theirs = record["sides"]["diffusers"]
    assert theirs["info"]["threads"] == record["config"]["threads"] and theirs["info"]["dtype"] == "torch.float32"
    for sample in theirs["samples"]:
        assert all(sample["stages"][name] > 0 for name in TIMED), sample["stages"]
        assert sum(sample["stages"].values()) == pytest.approx(sample["total"], rel=0.05)
        assert len(sample["steps"]) == STEPS + 1
    assert set(record["ratios"]["diffusers"]) == set(METRICS)
    mine = record["sides"]["diffrt"]["summary"]["unet_per_step"]["median"]
    expected = theirs["summary"]["unet_per_step"]["median"] / mine
    assert record["ratios"]["diffusers"]["unet_per_step"] == pytest.approx(expected)
    for label, _ in METRICS.values():
        line = next(line for line in stdout.splitlines() if line.startswith(label))
        assert line.rstrip().endswith("x"), line


@pytest.mark.slow
def test_one_at_a_time_runs_every_image_of_a_side_before_the_next_side_loads(preset_cache: Path, tmp_path: Path):
    record, stdout = _run_tiny(preset_cache, tmp_path / "sequential.json", "--compare", "diffusers", "--one-at-a-time")
    assert record["interleaved"] is False and record["options"]["one_at_a_time"] is True
    assert "one side after the other in the same run" in stdout
    times = {name: [s["finished"] for s in side["warmup"] + side["samples"]] for name, side in record["sides"].items()}
    assert len(times["diffrt"]) == len(times["diffusers"]) == RUNS + 1
    assert max(times["diffrt"]) < min(times["diffusers"])  # Diffusers' cold image came after diffrt's last one
    quality = record["quality"]["diffrt"]["psnr_vs_diffusers_db"]
    assert quality == "inf" or quality >= 45, quality


def test_engine_options_reach_every_diffrt_side(preset_cache: Path, tmp_path: Path):
    record, _ = _run_tiny(preset_cache, tmp_path / "options.json", "--provider", "cpu,openvino",
                          "--engine-option", "threads=1", "--engine-option",
                          "vae_decoder:graph_optimization_level=extended")
    for side in ("diffrt[cpu]", "diffrt[openvino]"):
        config = record["sides_config"][side]
        assert config["engine_options"] == {"threads": 1}
        assert config["component_options"] == {"vae_decoder": {"graph_optimization_level": "extended"}}
    # OpenVINO has no ONNX Runtime optimisation levels: that side fails with the option's name, the other runs
    assert "`graph_optimization_level` is not an option of provider 'openvino'" in record["failed"]["diffrt[openvino]"]
    assert record["sides"]["diffrt[cpu]"]["samples"]


def test_table_shows_each_stage(tiny_run):
    record, stdout = tiny_run
    for label, _ in METRICS.values():
        assert any(line.startswith(label) for line in stdout.splitlines()), label
    assert "UNet TFLOP/s" in stdout


@pytest.mark.parametrize("preset, latent", [
    ("tiny", 16), ("sd15", 64),
    pytest.param("sd21", 96, marks=pytest.mark.slow), pytest.param("sdxl", 128, marks=pytest.mark.slow),
])
def test_unet_flops_match_torch_flop_counter(preset: str, latent: int):
    """Oracle: torch's FlopCounterMode on the diffusers UNet (meta tensors for the real sizes), math SDPA so the
    attention products are counted too."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = load_preset(preset).spec["unet"]
    device = "cpu" if preset == "tiny" else "meta"
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
        sample, timestep = torch.zeros(2, 4, latent, latent), torch.zeros(2)
        text = torch.zeros(2, 77, config["cross_attention_dim"])
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.zeros(2, 6)}}
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        unet(sample, timestep, text, **extra)
    assert unet_flops(config, latent, latent, batch=2) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_unknown_preset_is_an_error_naming_the_choices(tmp_path: Path):
    result = _bench(["sd99"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert ("`package` must be a model package folder or a preset (tiny, sd15, sd21, sdxl, tiny-sd3, tiny-flux, sd35m, "
            "sd35m-6blocks, flux-schnell); got 'sd99'") in result.stderr


@pytest.mark.parametrize("changes, message", [
    ({"provider": "nosuchprovider"}, "nosuchprovider"),
    ({"compare": ("diffusers", "comfy")},
     "`compare` must be a comma-separated list of diffusers, optimum; got 'comfy'"),
    ({"steps": 0}, "`steps` must be an integer >= 1; got 0"),
    ({"runs": 0}, "`runs` must be an integer >= 1; got 0"),
    ({"height": 100}, "`height` must be a multiple of 8, at least 8; got 100"),
    ({"scheduler": "NoSuchScheduler"}, "`scheduler` must be a Diffusers scheduler class name"),
    ({"controlnets": 5}, "`controlnet` must be a number of ControlNets from 0 to 4; got 5"),
    ({"controlnets": -1}, "`controlnet` must be a number of ControlNets from 0 to 4; got -1"),
])
def test_bad_options_fail_before_any_work(changes: dict, message: str):
    with pytest.raises(InputError) as info:
        check_options(BenchOptions(target="tiny", **changes))
    assert message in str(info.value)


def test_package_without_a_needed_component_is_a_package_error(tiny_run, tmp_path: Path):
    record, _ = tiny_run
    package = tmp_path / "package"
    shutil.copytree(record["config"]["package"], package, ignore=shutil.ignore_patterns("unet"))
    for name in ("model_index.json", "diffrt.json"):
        data = json.loads((package / name).read_text())
        data.pop("unet", None)
        data.get("components", {}).pop("unet", None)
        (package / name).write_text(json.dumps(data))
    with pytest.raises(PackageError, match="has no unet component"):
        resolve(BenchOptions(target=str(package)))


@pytest.fixture(scope="module")
def providers_run(preset_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """Two diffrt sides (ONNX Runtime and OpenVINO, both fp32) interleaved in one run."""
    return _run_tiny(preset_cache, tmp_path_factory.mktemp("bench") / "tiny_providers.json",
                     "--provider", "cpu,openvino")


def test_several_providers_are_sides_of_one_interleaved_run(providers_run):
    record, stdout = providers_run
    names = ["diffrt[cpu]", "diffrt[openvino]"]
    assert list(record["sides"]) == names and record["reference"] == "diffrt[cpu]"
    assert record["sides"]["diffrt[openvino]"]["info"]["engine"] == "OpenVINOEngine"
    assert record["sides"]["diffrt[cpu]"]["info"]["engine"] == "OnnxRuntimeEngine"
    assert [s["round"] for s in record["sides"]["diffrt[openvino]"]["samples"]] == list(range(1, RUNS + 1))
    expected = (record["sides"]["diffrt[openvino]"]["summary"]["total"]["median"]
                / record["sides"]["diffrt[cpu]"]["summary"]["total"]["median"])
    assert record["ratios"]["diffrt[openvino]"]["total"] == pytest.approx(expected)
    # Both fp32: the same image to within float rounding.
    quality = record["quality"]["diffrt[openvino]"]["psnr_vs_first_db"]
    assert quality == "inf" or quality >= 40, quality
    assert "diffrt[openvino] median" in stdout


def test_host_share_and_cold_overhead_are_reported(tiny_run):
    record, stdout = tiny_run
    side = record["sides"]["diffrt"]
    share = side["summary"]["host_share"]["median"]
    sample = side["samples"][0]
    engines = sum(sample["stages"][k] for k in ("text_encoder", "unet", "vae_decode"))
    assert 0 < share < 1
    assert side["summary"]["host_share"]["min"] <= (sample["total"] - engines) / sample["total"]
    assert any(line.startswith("host share") for line in stdout.splitlines())
    assert any(line.startswith("cold: overhead") for line in stdout.splitlines())


@pytest.mark.parametrize("provider, vae, labels", [
    ("cpu", "full", ["diffrt"]),
    ("cpu,openvino:fp32", "full,tiny", ["diffrt[cpu]", "diffrt[cpu+tiny-vae]", "diffrt[openvino:fp32]",
                                         "diffrt[openvino:fp32+tiny-vae]"]),
])
def test_variants_are_each_provider_with_each_vae(provider: str, vae: str, labels: list[str]):
    opts = BenchOptions(target="tiny", provider=provider, vae=vae)
    assert side_names(opts) == labels
    assert [v.provider for v in variants(opts)][:1] == ["cpu"]


@pytest.mark.parametrize("changes, message", [
    ({"vae": "huge"}, "`vae` must be a comma-separated list of full, tiny; got 'huge'"),
    ({"provider": "cpu:bf16"}, "`provider` must be a precision suffix only on openvino, auto"),
    ({"provider": "openvino:fp8"}, "`inference_precision` must be one of 'fp32', 'bf16', 'int8', 'auto'; got 'fp8'"),
    ({"provider": "cpu,cpu"}, "`provider` must be a list without repeats"),
])
def test_bad_variants_fail_before_any_work(changes: dict, message: str):
    with pytest.raises(InputError) as info:
        check_options(BenchOptions(target="tiny", **changes))
    assert message in str(info.value)


def test_cuda_flags_make_sides_with_engine_options():
    opts = BenchOptions(target="tiny", provider="cuda,cuda:graph,cuda:graph+nhwc")
    assert side_names(opts) == ["diffrt[cuda]", "diffrt[cuda:graph]", "diffrt[cuda:graph+nhwc]"]
    assert [v.flags for v in variants(opts)] == [(), ("graph",), ("graph", "nhwc")]
    from diffrt.bench.runner import run_config, side_configs

    config = run_config(opts, Path("pkg"), None, 64)
    flags = [cfg.engine_flags for _, cfg in side_configs(opts, config, "images").values()]
    assert flags == [(), ("cuda_graph",), ("cuda_graph", "prefer_nhwc")]


@pytest.mark.parametrize("changes, message", [
    ({"provider": "cuda:fast"}, "`provider` must be CUDA flags from graph, nhwc joined by '+' (cuda:graph+nhwc); "
                                "got 'cuda:fast'"),
    ({"provider": "cpu", "export_target": "cuda"}, "`provider` must be cuda sides only with --target cuda"),
    ({"export_target": "coreml"}, "`target` must be one of onnxruntime, cuda, tensorrt; got 'coreml'"),
])
def test_bad_cuda_options_fail_before_any_work(changes: dict, message: str):
    with pytest.raises(InputError) as info:
        check_options(BenchOptions(target="tiny", **changes))
    assert message in str(info.value)


def test_a_side_that_fails_is_recorded_and_the_others_measured(tiny_run, preset_cache: Path, tmp_path: Path):
    record, _ = tiny_run
    package = tmp_path / "package"  # the tiny package, its source checkpoint gone: Diffusers cannot load it
    shutil.copytree(record["config"]["package"], package)
    manifest = json.loads((package / "diffrt.json").read_text())
    manifest["source"]["id"] = str(tmp_path / "deleted-checkpoint")
    (package / "diffrt.json").write_text(json.dumps(manifest))
    out = tmp_path / "failed.json"
    result = _bench([str(package), "--runs", "1", "--warmup", "0", "--steps", "2", "--compare", "diffusers",
                     "--json", str(out)], preset_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    failed = json.loads(out.read_text())
    assert set(failed["sides"]) == {"diffrt"} and "needs the source checkpoint" in failed["failed"]["diffusers"]
    assert failed["sides"]["diffrt"]["summary"]["total"]["n"] == 1
    assert "FAILED diffusers: diffusers side: --compare diffusers needs the source checkpoint" in result.stdout


def test_bf16_is_refused_exactly_where_the_cpu_lacks_it():
    from diffrt.runtime.engines.openvino import bf16_support

    opts = BenchOptions(target="tiny", provider="openvino:bf16")
    if bf16_support()[0]:
        check_options(opts)
    else:
        with pytest.raises(InputError, match="needs a CPU with avx512_bf16 or amx_bf16"):
            check_options(opts)


def test_psnr():
    image = np.zeros((4, 4, 3), np.uint8)
    other = image.copy()
    other[0, 0, 0] = 255  # mse = 255^2 / 48
    assert psnr(image, image) == float("inf")
    assert psnr(other, image) == pytest.approx(10 * np.log10(48))


def test_journal_keeps_each_sample_as_it_arrives(tmp_path: Path):
    from diffrt.bench.runner import Journal

    journal = Journal(tmp_path / "out.json.partial")
    journal.write("diffrt", "sample", {"total": 1.5, "round": 1})
    journal.write("diffusers", "sample", {"total": 2.5, "round": 1})
    lines = [json.loads(line) for line in (tmp_path / "out.json.partial").read_text().splitlines()]
    assert lines == [{"side": "diffrt", "kind": "sample", "total": 1.5, "round": 1},
                     {"side": "diffusers", "kind": "sample", "total": 2.5, "round": 1}]
    Journal(None).write("diffrt", "sample", {})  # no file: a no-op


@pytest.mark.slow
def test_tiny_vae_side_adds_the_taesd_decoder_once_and_reports_its_decode(preset_cache: Path, tmp_path: Path):
    record, stdout = _run_tiny(preset_cache, tmp_path / "tiny_vae.json", "--vae", "full,tiny")
    assert list(record["sides"]) == ["diffrt[cpu]", "diffrt[cpu+tiny-vae]"]
    tiny = record["sides"]["diffrt[cpu+tiny-vae]"]
    assert tiny["info"]["vae"] == "tiny" and all(s["stages"]["vae_decode"] > 0 for s in tiny["samples"])
    assert (Path(record["config"]["package"]) / "vae_decoder_tiny" / "model.onnx").is_file()
    # A different decoder (random weights): a different image, so its PSNR is finite.
    assert record["quality"]["diffrt[cpu+tiny-vae]"]["psnr_vs_first_db"] not in (None, "inf")


@pytest.fixture(scope="module")
def controlnet_run(preset_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """Two ControlNets (multi-ControlNet) against Diffusers' ControlNet pipeline: the tiny preset's package with
    random-weight ControlNets is built once (a minute), beside the plain one."""
    return _run_tiny(preset_cache, tmp_path_factory.mktemp("bench") / "tiny_controlnet.json",
                     "--controlnet", "2", "--compare", "diffusers")


@pytest.mark.slow
def test_controlnet_option_times_each_controlnet_call_against_diffusers(controlnet_run):
    record, stdout = controlnet_run
    assert record["config"]["controlnets"] == ["cn0", "cn1"]
    assert record["config"]["package"].endswith("-controlnet2")
    assert "ControlNets cn0, cn1" in next(line for line in stdout.splitlines() if " steps, guidance " in line)
    # Same weights, control images, seed and scheduler: the images agree as in the plain comparison. The preset's
    # ControlNets have random (non-zero) output convolutions, so their residuals shape the image on both sides.
    quality = record["quality"]["diffrt"]["psnr_vs_diffusers_db"]
    assert quality == "inf" or quality >= 45, quality
    for name, side in record["sides"].items():
        for sample in side["samples"]:
            stages = sample["stages"]
            assert stages["controlnet"] > 0 and all(stages[stage] > 0 for stage in TIMED), (name, stages)
            assert sum(stages.values()) == pytest.approx(sample["total"], rel=0.05), name
    assert record["sides"]["diffrt"]["info"]["controlnets"] == ["cn0", "cn1"]
    assert record["sides"]["diffrt"]["info"]["torch_imported"] is False
    assert set(record["ratios"]["diffusers"]) == set(METRICS) | set(OPTIONAL_METRICS)
    line = next(line for line in stdout.splitlines() if line.startswith("ControlNet / step"))
    assert line.rstrip().endswith("x"), line


def test_plain_runs_show_no_controlnet_row(tiny_run):
    record, stdout = tiny_run
    assert record["config"]["controlnets"] == []
    assert not any(line.startswith("ControlNet") for line in stdout.splitlines())


def test_controlnet_count_beyond_the_package_is_a_package_error(tiny_run):
    record, _ = tiny_run
    with pytest.raises(PackageError, match=r"has 0 ControlNet\(s\) \(none\); --controlnet 1 needs 1: add them with "
                       r"`diffrt export --controlnet CN --into"):
        resolve(BenchOptions(target=record["config"]["package"], controlnets=1))
