"""`diffrt bench` on the transformer pipelines (SD3 / SD3.5, FLUX.1): the tiny flow presets against Diffusers, the
MMDiT FLOP counts against torch's counter, and the real-size presets' refusal before anything is built.

The end-to-end runs build `tiny-sd3` / `tiny-flux` once (seconds) into the same cache as tests/test_bench.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffrt.bench.flops import flux_flops, sd3_flops
from diffrt.bench.presets import load_preset
from diffrt.bench.report import METRICS, TIMED
from diffrt.bench.runner import BenchOptions, check_options
from diffrt.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark.py"
RUNS = 2
STEPS = 3
GB = 1e9


def _bench(args: list[str], cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFRT_CACHE=str(cache))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def preset_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("DIFFRT_CACHE"):
        return Path(os.environ["DIFFRT_CACHE"])
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("diffrt-cache") if cache is not None else tmp_path_factory.mktemp("diffrt-cache")


def _compared(preset: str, cache: Path, out: Path) -> tuple[dict, str]:
    result = _bench([preset, "--runs", str(RUNS), "--warmup", "1", "--steps", str(STEPS), "--height", "128",
                     "--width", "128", "--compare", "diffusers", "--json", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def sd3_run(preset_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    return _compared("tiny-sd3", preset_cache, tmp_path_factory.mktemp("bench") / "tiny_sd3.json")


def _check_compared(record: dict, stdout: str, pipeline: str) -> None:
    assert record["denoiser"] == "transformer" and record["interleaved"] is True
    assert set(record["sides"]) == {"diffrt", "diffusers"}
    mine, theirs = record["sides"]["diffrt"], record["sides"]["diffusers"]
    assert mine["info"]["torch_imported"] is False
    assert mine["info"]["pipeline"] == theirs["info"]["pipeline"] == pipeline
    assert mine["info"]["denoiser"] == "transformer" and theirs["info"]["dtype"] == "torch.float32"
    for name, side in record["sides"].items():
        assert len(side["samples"]) == RUNS and len(side["warmup"]) == 1
        assert side["unet_tflops"] > 0 and side["peak_rss_mb"] > 0
        for sample in side["samples"]:
            stages = sample["stages"]
            assert all(stages[stage] > 0 for stage in TIMED), (name, stages)
            # within 5%, beyond the ~2 ms per call no stage timer covers (input checks, latent draws, the schedule):
            # a tiny model's whole call is tens of milliseconds
            assert sum(stages[stage] for stage in TIMED) == pytest.approx(sample["total"], rel=0.05, abs=0.003), name
            # flow-matching Euler: one transformer call per step
            assert len(sample["steps"]) == STEPS
            assert sum(step["unet"] for step in sample["steps"]) == pytest.approx(stages["unet"], rel=1e-6)
    # Same weights, seed and schedule: the same image to within float rounding.
    quality = record["quality"]["diffrt"]["psnr_vs_diffusers_db"]
    assert quality == "inf" or quality >= 45, quality
    assert set(record["ratios"]["diffusers"]) == set(METRICS)
    expected = theirs["summary"]["unet_per_step"]["median"] / mine["summary"]["unet_per_step"]["median"]
    assert record["ratios"]["diffusers"]["unet_per_step"] == pytest.approx(expected)
    lines = stdout.splitlines()
    for label in ("transformer / step", "text encoding", "VAE decode", "total"):
        line = next(line for line in lines if line.startswith(label))
        assert line.rstrip().endswith("x"), line
    assert not any(line.startswith("UNet") for line in lines)
    assert any(line.startswith("transformer TFLOP/s") for line in lines)


def test_tiny_sd3_against_diffusers_times_every_stage_of_the_transformer_pipeline(sd3_run):
    record, stdout = sd3_run
    _check_compared(record, stdout, "StableDiffusion3Pipeline")
    # CFG: two rows per transformer call at 128x128 (a 16x16 latent)
    config = load_preset("tiny-sd3").spec["transformer"]
    assert record["unet_flops_per_step"] == pytest.approx(sd3_flops(config, 16, 16, batch=2))


@pytest.mark.slow
def test_tiny_flux_against_diffusers(preset_cache: Path, tmp_path: Path):
    record, stdout = _compared("tiny-flux", preset_cache, tmp_path / "tiny_flux.json")
    _check_compared(record, stdout, "FluxPipeline")
    # schnell: no classifier-free guidance, one row per call
    config = load_preset("tiny-flux").spec["transformer"]
    assert record["unet_flops_per_step"] == pytest.approx(flux_flops(config, 16, 16, batch=1))


def _flop_counter_total(preset: str) -> tuple[float, float]:
    """(torch's FlopCounterMode total, our count) for one transformer call: the tiny presets on the CPU, the real
    sizes on the meta device; math SDPA so the attention products are counted."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffrt.bench.presets import make_model

    spec = load_preset(preset).spec
    config = spec["transformer"]
    device = "cpu" if preset.startswith("tiny") else "meta"
    latent = 8 if device == "cpu" else 64  # 512x512 for the real sizes
    with torch.device(device):
        model = make_model(spec, "transformer")
        if "Flux" in config["_class_name"]:
            tokens, seq, rows = (latent // 2) ** 2, 512, 1
            args = dict(hidden_states=torch.zeros(rows, tokens, config["in_channels"]),
                        encoder_hidden_states=torch.zeros(rows, seq, config["joint_attention_dim"]),
                        pooled_projections=torch.zeros(rows, config["pooled_projection_dim"]),
                        timestep=torch.zeros(rows), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(seq, 3))
            ours = flux_flops(config, latent, latent, rows)
        else:
            rows = 2
            args = dict(hidden_states=torch.zeros(rows, config["in_channels"], latent, latent),
                        encoder_hidden_states=torch.zeros(rows, 77 + 256, config["joint_attention_dim"]),
                        pooled_projections=torch.zeros(rows, config["pooled_projection_dim"]),
                        timestep=torch.zeros(rows))
            ours = sd3_flops(config, latent, latent, rows)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**args)
    return counter.get_total_flops(), ours


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux", "sd35m", "sd35m-6blocks", "flux-schnell"])
def test_transformer_flops_match_torch_flop_counter(preset: str):
    counted, ours = _flop_counter_total(preset)
    assert ours == pytest.approx(counted, rel=1e-9)


def test_sd35m_step_flops_at_512():
    """One CFG step of SD 3.5 medium at 512x512 (333 text tokens): the figure docs/benchmarks.md quotes."""
    config = load_preset("sd35m").spec["transformer"]
    assert sd3_flops(config, 64, 64, batch=2) / 1e12 == pytest.approx(4.885, abs=1e-3)


def test_derived_preset_overrides_the_transformer_only():
    full, six = load_preset("sd35m").spec, load_preset("sd35m-6blocks").spec
    assert six["transformer"] == {**full["transformer"], "num_layers": 6, "dual_attention_layers": [0, 1, 2]}
    assert {k: v for k, v in six.items() if k not in ("transformer", "description")} == \
        {k: v for k, v in full.items() if k not in ("transformer", "description")}
    assert load_preset("sd35m").key != load_preset("sd35m-6blocks").key
    assert load_preset("sd35m").built == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert load_preset("sd35m").exported == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]
    assert load_preset("flux-schnell").exported == ["text_encoder", "text_encoder_2", "transformer", "vae_decoder"]


# On the 2-core, 24 GiB dev machine: ~22 GB of memory available and ~21.7 GB of free disk when idle.
DEV_MACHINE = dict(available=int(22 * GB), free_disk=int(21.7 * GB))


def test_flux_schnell_is_refused_before_building_with_its_sizes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from diffrt.bench.preset_fit import check_fits

    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFRT_SKIP_MEMORY_CHECK", raising=False)
    with pytest.raises(InputError) as info:
        check_fits(load_preset("flux-schnell"), **DEV_MACHINE)
    message = str(info.value)
    assert "preset 'flux-schnell' cannot fit this machine, nothing was built" in message
    assert "transformer 11.89B values" in message and "text_encoder_2 4.76B values" in message
    assert re.search(r"drawing its weights \(the largest model in float32\) needs 5\d\.\d GB of memory", message)
    assert not any(tmp_path.iterdir())


def test_sd35m_is_refused_for_disk_and_runs_one_side_at_a_time_where_two_do_not_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from diffrt.bench.preset_fit import check_fits

    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFRT_SKIP_MEMORY_CHECK", raising=False)
    with pytest.raises(InputError) as info:
        check_fits(load_preset("sd35m"), **DEV_MACHINE)
    message = str(info.value)
    assert "need 20.1 GB of disk, 19.5 GB is usable" in message and "text_encoder_3 is left out already" in message
    assert "GB of memory" not in message  # one side at a time fits 22 GB
    roomy = dict(DEV_MACHINE, free_disk=int(80 * GB))
    need = check_fits(load_preset("sd35m"), **roomy)
    assert 13 * GB < need["run"] < 16 * GB and 27 * GB < need["beside"] < 29 * GB
    with pytest.raises(InputError) as info:  # an interleaved benchmark holds both sides' weights at once
        check_fits(load_preset("sd35m"), **roomy, beside=True)
    assert re.search(r"beside Diffusers at once .* needs 2\d\.\d GB of memory, 22\.0 GB is available", str(info.value))
    assert "--one-at-a-time" in str(info.value)
    need = check_fits(load_preset("sd35m-6blocks"), **DEV_MACHINE, beside=True)
    assert need["disk"] < 10 * GB and need["beside"] < 15 * GB
    monkeypatch.setenv("DIFFRT_SKIP_MEMORY_CHECK", "1")  # skips the memory checks, not the disk one
    with pytest.raises(InputError, match="GB of disk") as info:
        check_fits(load_preset("sd35m"), **DEV_MACHINE, beside=True)
    assert "GB of memory" not in str(info.value)


def test_bench_of_a_preset_that_cannot_fit_fails_with_the_reason(tmp_path: Path):
    result = _bench(["flux-schnell", "--steps", "1"], tmp_path, timeout=300)
    assert result.returncode != 0
    assert "preset 'flux-schnell' cannot fit this machine, nothing was built" in result.stderr
    assert not (tmp_path / "presets").exists() or not any((tmp_path / "presets").iterdir())


@pytest.mark.parametrize("changes, message", [
    ({"controlnets": 1}, "`controlnet` must be 0 for preset tiny-sd3 (a transformer pipeline"),
    ({"vae": "tiny"}, "`vae` must be full for preset tiny-sd3 (the tiny VAE, TAESD, decodes 4-channel latents"),
])
def test_unet_only_options_are_refused_for_transformer_presets(changes: dict, message: str):
    with pytest.raises(InputError) as info:
        check_options(BenchOptions(target="tiny-sd3", **changes))
    assert message in str(info.value)


def test_diffusers_side_passes_none_for_models_the_checkpoint_lacks(tmp_path: Path):
    """sd35m's checkpoint has no T5 (`text_encoder_3: [null, null]`): Diffusers loads it only when told None."""
    from diffrt.bench.diffusers_side import absent_components

    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "image_encoder": [None, None],
             "transformer": ["diffusers", "SD3Transformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    # image_encoder is one of the pipeline's optional components: Diffusers handles it itself
    assert absent_components(str(tmp_path)) == {"text_encoder_3": None, "tokenizer_3": None}


def test_a_second_build_of_a_preset_waits_for_the_first_then_finds_it_built(tmp_path: Path):
    """Two benchmarks of one uncached preset: the second build waits on the preset's lock instead of exporting the
    same package beside the first, and runs once the first lets go (a real child process, a real flock)."""
    import fcntl
    import time

    from diffrt.bench.preset_build import LOCK_NAME

    env = dict(os.environ, DIFFRT_CACHE=str(tmp_path))
    folder = tmp_path / "presets" / load_preset("tiny").key
    folder.mkdir(parents=True)
    log = tmp_path / "child.log"
    with open(folder / LOCK_NAME, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "the first build"
        with open(log, "w") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "diffrt.bench.preset_build", "tiny", "--checkpoint-only"],
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while "waiting for that build" not in log.read_text() and time.monotonic() < deadline:
            assert child.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "another process is building it" in log.read_text()
        assert child.poll() is None and not (folder / "checkpoint").exists()
    stdout, _ = child.communicate(timeout=600)  # the lock is free: the child builds
    assert child.returncode == 0, log.read_text()[-2000:]
    assert Path(stdout.strip().splitlines()[-1]) == folder / "checkpoint"
