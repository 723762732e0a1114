"""DeepCache (Ma et al. 2023): export (`unet` + `deep_cache_feature`, `unet_shallow`) and `deep_cache_interval`.

Oracle: DeepCache's own mechanism on Diffusers' `UNet2DConditionModel` (tests/deep_cache_oracle.py: module outputs
cached and replayed as DeepCache's helper does, no diffrt code), in the Diffusers pipeline on the same checkpoint,
same seed. Tolerances: our torch modules vs the oracle 1e-5 (float32 torch on both sides); diffrt's package on ONNX
Runtime vs the oracle's Diffusers pipeline 1e-3 on [0, 1] images, as every pipeline parity test
(tests/test_runtime_pipelines.py); `deep_cache_interval` 1 or None: the plain pipeline's image exactly.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from concurrency import run_in_threads
from deep_cache_oracle import DeepCacheOracle

from diffrt.errors import InputError, PackageError
from diffrt.package.names import DEEP_CACHE_FEATURE, UNET_SHALLOW
from diffrt.package.reader import ModelPackage
from diffrt.runtime import DiffusionPipeline
from diffrt.runtime.builtin import resolve_builtin

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-3
MODULE_TOL = 1e-5
CALL = dict(prompt="a photo of a cat", num_inference_steps=7, output_type="np")


def ours(package: Path, **options) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(package, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_runs(pipe: DiffusionPipeline) -> dict[str, int]:
    """Count every run of the UNet and shallow-UNet engines (the engine objects' own `run`, wrapped)."""
    counts = {"unet": 0, UNET_SHALLOW: 0}
    for name in counts:
        engine = pipe.engine(name)
        run = engine.run

        def counted(feeds, release_memory=False, name=name, run=run):
            counts[name] += 1
            return run(feeds, release_memory=release_memory)

        engine.run = counted  # type: ignore[method-assign]
    return counts


def expected_runs(steps: int, interval: int) -> dict[str, int]:
    full = len(range(0, steps, interval))
    return {"unet": full, UNET_SHALLOW: steps - full}


def assert_close(expected, got, tol=TOL):
    diff = float(np.abs(np.asarray(expected) - np.asarray(got)).max())
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol:.0e}"


# ----- our torch UNet against DeepCache's mechanism on Diffusers' UNet (no export) -----
def _unet_pair(kind: str):
    from checkpoint_fixtures import _sdxl_unet, make_unet

    from diffrt.export.models import UNet2DConditionModel

    reference = {
        "sd15": make_unet,
        "sdxl": lambda: _sdxl_unet(64, 6),
        "three_levels": lambda: make_unet(  # SD's layout: 3 skip connections per level
            layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    }[kind]()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(Path(folder) / "unet")
        return reference, UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()


def _steps(reference, count: int = 5):
    """Per-step UNet inputs (odd latent sides: the upsamplers must follow the skip connections' sizes)."""
    generator = torch.Generator().manual_seed(0)
    extra = {}
    if reference.config.addition_embed_type == "text_time":
        extra = {"text_embeds": torch.randn(2, 32, generator=generator),
                 "time_ids": torch.rand(2, 6, generator=generator) * 1000}
    return [(torch.randn(2, 4, 12, 10, generator=generator), torch.tensor([900.0 - 150 * i] * 2),
             torch.randn(2, 77, reference.config.cross_attention_dim, generator=generator), extra)
            for i in range(count)]


@pytest.mark.parametrize("kind", ["sd15", "sdxl", pytest.param("three_levels", marks=pytest.mark.slow)])
def test_every_branch_matches_deepcache_module_caching_on_the_diffusers_unet(kind):
    from diffrt.export.deep_cache import branch_count, feature_layout

    reference, unet = _unet_pair(kind)
    steps = _steps(reference)
    assert unet.skip_count() == branch_count(unet.config)
    for branch in range(unet.skip_count()):
        with torch.no_grad(), DeepCacheOracle(reference, interval=3, branch=branch):
            expected = [reference(x, t, e, added_cond_kwargs=extra or None).sample for x, t, e, extra in steps]
        feature = None
        with torch.no_grad():
            for i, (x, t, e, extra) in enumerate(steps):
                if i % 3 == 0:
                    got, feature = unet.forward_features(x, t, e, **extra, deep_cache_branch=branch)
                    channels, level = feature_layout(unet.config, branch)
                    assert feature.shape == (2, channels, -(-12 // 2**level), -(-10 // 2**level))
                else:
                    got = unet.forward_shallow(branch, feature, x, t, e, **extra)
                assert_close(expected[i], got, MODULE_TOL)
        cached_step = unet(*steps[1][:3], **steps[1][3])
        assert not torch.allclose(cached_step, expected[1], atol=1e-3), "a cached step must not be the full UNet"


@pytest.mark.parametrize("kind", ["sd15", "three_levels"])
def test_the_shallow_pass_with_its_own_steps_feature_is_the_full_unet_exactly(kind):
    _, unet = _unet_pair(kind)
    x, t, e, extra = _steps(_unet_pair(kind)[0], 1)[0]
    with torch.no_grad():
        full = unet(x, t, e, **extra)
        for branch in range(unet.skip_count()):
            out, feature = unet.forward_features(x, t, e, **extra, deep_cache_branch=branch)
            assert torch.equal(out, full)
            assert torch.equal(unet.forward_shallow(branch, feature, x, t, e, **extra), full)


# ----- export -----
def test_export_adds_the_feature_output_and_a_shallow_unet_of_the_shallow_weights(tiny_deep_cache_package):
    root = tiny_deep_cache_package("sd15")
    manifest = json.loads((root / "diffrt.json").read_text())
    assert manifest["deep_cache"] == {"branch": 0}
    unet, shallow = manifest["components"]["unet"], manifest["components"][UNET_SHALLOW]
    feature = {"name": DEEP_CACHE_FEATURE, "dtype": "float32", "shape": ["batch", 32, "height", "width"]}
    assert unet["outputs"][-1] == feature and shallow["inputs"][-1] == feature
    assert [spec["name"] for spec in shallow["inputs"][:-1]] == [spec["name"] for spec in unet["inputs"]]
    assert shallow["outputs"] == unet["outputs"][:1] and shallow["dims"] == unet["dims"]
    assert shallow["validation"]["max_abs_diff"] <= shallow["validation"]["tolerance"]
    assert set(shallow["parameters"]) < set(unet["parameters"])  # LoRA finds the shallow weights by the same names
    assert (root / UNET_SHALLOW / "model.onnx").stat().st_size < 0.2 * (root / "unet" / "model.onnx").stat().st_size
    assert UNET_SHALLOW not in json.loads((root / "model_index.json").read_text())  # Diffusers, Optimum: plain UNet
    assert ModelPackage.open(root).deep_cache_branch == 0


def test_export_validates_the_sdxl_shaped_unet_with_text_time_inputs(tiny_deep_cache_package):
    manifest = json.loads((tiny_deep_cache_package("sdxl") / "diffrt.json").read_text())
    names = [spec["name"] for spec in manifest["components"][UNET_SHALLOW]["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", DEEP_CACHE_FEATURE]
    for name in ("unet", UNET_SHALLOW):
        validation = manifest["components"][name]["validation"]
        assert validation["max_abs_diff"] <= validation["tolerance"]


@pytest.mark.parametrize(("options", "fragments"), [
    (dict(deep_cache=True, controlnets=["pose=lllyasviel/sd-controlnet-openpose"]), ("`deep_cache`", "controlnets")),
    (dict(deep_cache=True, deep_cache_branch=4), ("`deep_cache_branch`", "[0, 3]")),
    (dict(deep_cache=True, deep_cache_branch=-1), ("`deep_cache_branch`", ">= 0")),
    (dict(deep_cache=True, deep_cache_branch="0"), ("`deep_cache_branch`",)),
    (dict(deep_cache_branch=2), ("`deep_cache_branch`", "deep_cache=True")),
    (dict(deep_cache="yes"), ("`deep_cache`", "True or False")),
    (dict(deep_cache=True, components=["text_encoder", "vae_decoder"]), ("`deep_cache`", "add unet")),
])
def test_export_refuses_what_deep_cache_cannot_do_before_writing_anything(tiny_checkpoint, tmp_path, options,
                                                                          fragments):
    from diffrt.export import export_pipeline

    with pytest.raises(InputError) as error:
        export_pipeline(tiny_checkpoint("sd15"), tmp_path / "out", **options)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "out").exists()


def test_controlnets_cannot_be_added_to_a_deep_cache_package(tiny_deep_cache_package):
    from diffrt.export import add_controlnets

    root = tiny_deep_cache_package("sd15")
    before = (root / "diffrt.json").read_bytes()
    with pytest.raises(InputError, match="DeepCache"):
        add_controlnets(root, ["pose=lllyasviel/sd-controlnet-openpose"])
    assert (root / "diffrt.json").read_bytes() == before


@pytest.mark.parametrize("damage", ["branch", "component"])
def test_a_damaged_deep_cache_record_fails_when_the_package_opens(tiny_deep_cache_package, tmp_path, damage):
    root = shutil.copytree(tiny_deep_cache_package("sd15"), tmp_path / "package")
    manifest = json.loads((root / "diffrt.json").read_text())
    if damage == "branch":
        manifest["deep_cache"] = {"branch": "zero"}
    else:
        del manifest["components"][UNET_SHALLOW]
        shutil.rmtree(root / UNET_SHALLOW)
    (root / "diffrt.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="deep_cache"):
        ModelPackage.open(root)


# ----- runtime -----
def _oracle_image(folder: Path, interval: int, seed: int = 0, pipeline_class=None, scheduler=None, full_calls=None,
                  **call):
    reference = diffusers.DiffusionPipeline.from_pretrained(folder)
    if pipeline_class is not None:
        reference = pipeline_class.from_pipe(reference)
    if scheduler is not None:
        reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad(), DeepCacheOracle(reference.unet, interval, full_calls=full_calls):
        return np.asarray(reference(generator=torch.Generator("cpu").manual_seed(seed), **call).images)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_interval_3_matches_deepcache_on_the_diffusers_pipeline(kind, tiny_checkpoint, tiny_deep_cache_package):
    expected = _oracle_image(tiny_checkpoint(kind), 3, **CALL)
    pipe = ours(tiny_deep_cache_package(kind))
    counts = count_runs(pipe)
    got = pipe(generator=0, deep_cache_interval=3, **CALL).images
    assert_close(expected, got)
    assert counts == expected_runs(len(pipe_steps(pipe, 7)), 3)


def test_the_nonuniform_schedule_matches_deepcache_run_at_the_same_steps(tiny_checkpoint, tiny_deep_cache_package):
    from diffrt.runtime.pipelines.deep_cache import full_steps

    pipe = ours(tiny_deep_cache_package("sd15"), deep_cache_schedule="nonuniform")
    steps = len(pipe_steps(pipe, 7))  # PNDM: 8 UNet calls for 7 steps
    full = full_steps(steps, 3, "nonuniform")
    assert full != full_steps(steps, 3), "the schedules must differ for this test to mean anything"
    expected = _oracle_image(tiny_checkpoint("sd15"), 3, full_calls=full, **CALL)
    counts = count_runs(pipe)
    assert_close(expected, pipe(generator=0, deep_cache_interval=3, **CALL).images)
    assert counts == expected_runs(steps, 3)  # as many full runs as the uniform schedule: the same speed-up


@pytest.mark.parametrize("interval", [2, 3, 4, 5])
@pytest.mark.parametrize("steps", [2, 4, 7, 8, 10, 20, 25, 50])
def test_the_nonuniform_schedule_has_the_uniform_count_densest_first(steps, interval):
    from diffrt.runtime.pipelines.deep_cache import full_steps

    uniform, nonuniform = sorted(full_steps(steps, interval)), sorted(full_steps(steps, interval, "nonuniform"))
    assert uniform == list(range(0, steps, interval))
    assert len(nonuniform) == len(uniform) and nonuniform[0] == 0 and nonuniform[-1] <= steps - 1
    if len(nonuniform) > 2:
        gaps = np.diff(nonuniform)
        half = len(gaps) // 2  # denser first: the gaps grow (up to rounding)
        assert gaps[0] <= interval <= gaps.max() and gaps[:half].mean() <= gaps[half:].mean(), nonuniform
    # the last full run leaves no more shallow steps after it than the uniform schedule's can
    assert steps - 1 - nonuniform[-1] <= interval - 1


def test_a_bad_schedule_is_refused_by_name(tiny_deep_cache_package):
    with pytest.raises(InputError, match=r"`deep_cache_schedule` must be 'uniform' or 'nonuniform'; got 'fast'"):
        ours(tiny_deep_cache_package("sd15"), deep_cache_schedule="fast")
    pipe = ours(tiny_deep_cache_package("sd15"))
    with pytest.raises(InputError, match=r"`deep_cache_schedule` must be 'uniform' or 'nonuniform'; got 'Uniform'"):
        pipe.deep_cache_schedule = "Uniform"  # refused when set, before any call
    assert pipe.deep_cache_schedule == "uniform" and pipe._engines == {}


def pipe_steps(pipe: DiffusionPipeline, steps: int) -> np.ndarray:
    scheduler = pipe.fresh_scheduler()
    scheduler.set_timesteps(steps)
    return np.asarray(scheduler.timesteps)


def test_img2img_matches_deepcache_on_the_diffusers_pipeline(tiny_checkpoint, tiny_deep_cache_package):
    from diffrt import schedulers
    from diffrt.runtime import StableDiffusionImg2ImgPipeline

    image = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
    call = dict(CALL, image=image, strength=0.8)
    expected = _oracle_image(tiny_checkpoint("sd15"), 2, pipeline_class=diffusers.StableDiffusionImg2ImgPipeline,
                             scheduler="EulerDiscreteScheduler", **call)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_deep_cache_package("sd15"))
    pipe.scheduler = schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert_close(expected, pipe(generator=0, deep_cache_interval=2, **call).images)


@pytest.mark.parametrize("interval", [None, 1])
def test_interval_1_or_none_is_the_plain_pipeline_exactly(interval, tiny_package, tiny_deep_cache_package):
    plain = ours(tiny_package("sd15"))(generator=0, **CALL).images
    pipe = ours(tiny_deep_cache_package("sd15"))
    counts = count_runs(pipe)
    got = pipe(generator=0, deep_cache_interval=interval, **CALL).images
    np.testing.assert_array_equal(got, plain)
    assert counts[UNET_SHALLOW] == 0


@pytest.mark.parametrize(("task", "interval"), [("text2image", 2), ("text2image", 3), ("text2image", 5),
                                                ("image2image", 3), ("inpainting", 3)])
def test_the_full_unet_runs_every_interval_steps_and_the_shallow_unet_between(task, interval,
                                                                             tiny_deep_cache_package):
    from diffrt.runtime.pipelines.auto import plain_pipeline

    pipe = plain_pipeline(task, tiny_deep_cache_package("sd15"))
    pipe.set_progress_bar_config(disable=True)
    call = dict(CALL, generator=0)
    if task != "text2image":
        call.update(image=np.full((1, 64, 64, 3), 0.5, np.float32), strength=1.0)
    if task == "inpainting":
        call["mask_image"] = np.ones((1, 64, 64), np.float32)
    full = pipe(**call).images
    counts = count_runs(pipe)
    cached = pipe(**call, deep_cache_interval=interval).images
    assert counts == expected_runs(len(pipe_steps(pipe, 7)), interval)
    assert float(np.abs(full - cached).max()) > 1e-3, "the cached steps must really skip the deep UNet"
    again = pipe(**call, deep_cache_interval=interval).images  # a call keeps no cache for the next one
    np.testing.assert_array_equal(again, cached)


def test_concurrent_calls_keep_their_own_cache(tiny_deep_cache_package):
    pipe = ours(tiny_deep_cache_package("sd15"))
    intervals = [None, 2, 3, 2]
    alone = [pipe(generator=i, deep_cache_interval=n, **CALL).images for i, n in enumerate(intervals)]
    together: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        together[i] = pipe(generator=i, deep_cache_interval=intervals[i], **CALL).images

    assert run_in_threads(work, len(intervals)) == []
    for i in range(len(intervals)):
        np.testing.assert_array_equal(together[i], alone[i])


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "3", [3]])
def test_a_bad_interval_is_refused_by_name_before_any_engine_runs(value, tiny_deep_cache_package):
    pipe = ours(tiny_deep_cache_package("sd15"))
    with pytest.raises(InputError, match=r"`deep_cache_interval` must be None or an int >= 1"):
        pipe(generator=0, deep_cache_interval=value, **CALL)
    assert pipe._engines == {}  # lazy engines: none was created, so none ran


def test_a_package_without_deep_cache_says_how_to_export_one():
    pipe = ours(resolve_builtin("digits"))
    with pytest.raises(InputError, match=r"`deep_cache_interval`.*--deep-cache") as error:
        pipe("a handwritten seven", num_inference_steps=4, deep_cache_interval=3)
    assert UNET_SHALLOW in str(error.value)
    assert pipe._engines == {}
    assert pipe("a handwritten seven", num_inference_steps=2, deep_cache_interval=1, output_type="np").images.shape


def test_controlnet_pipelines_refuse_deep_cache():
    from diffrt.runtime.pipelines.controlnet import StableDiffusionControlNetPipeline

    with pytest.raises(InputError, match=r"`deep_cache_interval` must be None or 1 with ControlNets"):
        StableDiffusionControlNetPipeline.check_deep_cache(None, 3)  # type: ignore[arg-type]  # uses no state
    assert StableDiffusionControlNetPipeline.check_deep_cache(None, 1) is None  # type: ignore[arg-type]


def test_warmup_and_eager_load_prepare_the_shallow_unet(tiny_deep_cache_package):
    pipe = ours(tiny_deep_cache_package("sd15"))
    assert UNET_SHALLOW in pipe.engine_names()
    counts = count_runs(pipe)
    pipe.warmup(64, 64, deep_cache_interval=2)  # a 2-step call: the full UNet, then the shallow one
    assert counts == expected_runs(len(pipe_steps(pipe, 2)), 2) and counts[UNET_SHALLOW] >= 1


@pytest.mark.slow
def test_openvino_runs_the_deep_cache_schedule_as_onnx_runtime_does(tiny_deep_cache_package):
    from diffrt.runtime.engines.openvino import openvino_available

    if not openvino_available():
        pytest.skip("openvino is not installed")
    package = tiny_deep_cache_package("sdxl")
    expected = ours(package)(generator=0, deep_cache_interval=3, **CALL).images
    pipe = ours(package, provider="openvino")
    counts = count_runs(pipe)
    got = pipe(generator=0, deep_cache_interval=3, **CALL).images
    assert_close(expected, got)
    assert counts == expected_runs(7, 3)


@pytest.mark.slow
def test_a_lora_reaches_the_shallow_unet_as_diffusers_applies_it(tiny_checkpoint, tiny_deep_cache_package, tmp_path):
    pytest.importorskip("peft")
    from lora_files import peft_lora

    # resnet convolutions too: the tiny SD UNet's shallow path at branch 0 is one resnet, without attention
    path = peft_lora(tiny_checkpoint("sd15"), "sd15", tmp_path / "lora", seed=1, conv=True)
    reference = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint("sd15"))
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(path.parent), weight_name=path.name)
    with torch.no_grad(), DeepCacheOracle(reference.unet, 3):
        expected = reference(generator=torch.Generator("cpu").manual_seed(0), **CALL).images
    pipe = ours(tiny_deep_cache_package("sd15"))
    pipe.load_lora_weights(path.parent, weight_name=path.name)
    assert pipe.adapters.overrides(UNET_SHALLOW), "the shallow UNet's own copies of the weights must change too"
    assert_close(expected, pipe(generator=0, deep_cache_interval=3, **CALL).images)


# ----- command line and benchmark -----
def test_generate_with_deep_cache_writes_the_image_and_records_the_interval(tiny_deep_cache_package, tmp_path):
    from cli_runner import run_cli
    from PIL import Image

    result = run_cli("generate", tiny_deep_cache_package("sd15"), "a cat", "--steps", "4", "--deep-cache", "3",
                     "--seed", "5", "-o", tmp_path / "cat.png")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cat.png") as image:
        record = json.loads(image.text["diffrt"])
    assert record["deep_cache_interval"] == 3 and record["deep_cache_schedule"] == "uniform"
    result = run_cli("generate", tiny_deep_cache_package("sd15"), "a cat", "--steps", "4", "--deep-cache", "3",
                     "--deep-cache-schedule", "nonuniform", "--seed", "5", "-o", tmp_path / "cat2.png")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cat2.png") as image, Image.open(tmp_path / "cat.png") as uniform:
        record = json.loads(image.text["diffrt"])
        assert not np.array_equal(np.asarray(image), np.asarray(uniform))  # PNDM's 5 calls: full at 0, 3 / 0, 2
    assert record["deep_cache_interval"] == 3 and record["deep_cache_schedule"] == "nonuniform"
    # the record repeats the image: the schedule comes back from the PNG
    result = run_cli("generate", tiny_deep_cache_package("sd15"), "--from-png", tmp_path / "cat2.png",
                     "-o", tmp_path / "again.png")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "cat2.png") as first, Image.open(tmp_path / "again.png") as again:
        np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


@pytest.mark.parametrize(("args", "fragments"), [
    (("digits", "a handwritten seven", "--deep-cache", "2"), ("`deep_cache_interval`", "--deep-cache")),
    (("digits", "a seven", "--controlnet", "pose", "--control-image", "pose.png", "--deep-cache", "3"),
     ("`--deep-cache` does not combine with `--controlnet`",)),
    (("digits", "a seven", "--deep-cache", "0"), ("--deep-cache", "expected an integer >= 1")),
    (("digits", "a seven", "--deep-cache-schedule", "nonuniform"),
     ("`--deep-cache-schedule` applies with `--deep-cache N`",)),
])
def test_generate_deep_cache_mistakes_are_one_line_errors(args, fragments, tmp_path):
    from cli_runner import one_line_error, run_cli

    result = run_cli("generate", *args, "-o", tmp_path / "x.png", cwd=tmp_path)
    assert result.returncode == 2
    one_line_error(result.stderr, "generate", *fragments)
    assert not (tmp_path / "x.png").exists()


def test_export_deep_cache_branch_needs_deep_cache(tiny_checkpoint, tmp_path):
    from cli_runner import one_line_error, run_cli

    result = run_cli("export", tiny_checkpoint("sd15"), tmp_path / "out", "--deep-cache-branch", "1")
    assert result.returncode == 2
    one_line_error(result.stderr, "export", "`--deep-cache-branch` applies with `--deep-cache` only")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_command_writes_the_branch_it_was_given(tiny_checkpoint, tmp_path):
    from cli_runner import run_cli

    result = run_cli("export", tiny_checkpoint("sd15"), tmp_path / "out", "--deep-cache", "--deep-cache-branch", "1",
                     "--components", "text_encoder,unet,vae_decoder", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    package = ModelPackage.open(tmp_path / "out")
    assert package.deep_cache_branch == 1
    # branch 1 of the tiny SD UNet: the last up block's input, the output of up_blocks[-2] (64 channels)
    assert package.component(UNET_SHALLOW).inputs[-1].shape == ("batch", 64, "height", "width")


def test_bench_makes_each_interval_a_side_and_refuses_what_cannot_run(tiny_deep_cache_package):
    from diffrt.bench.runner import BenchOptions, check_options, resolve, side_names, variants

    opts = BenchOptions(target=str(tiny_deep_cache_package("sd15")), deep_cache=(1, 3))
    assert [variant.deep_cache for variant in variants(opts)] == [None, 3]
    assert side_names(opts) == ["diffrt[cpu]", "diffrt[cpu+deep-cache-3]"]
    with pytest.raises(InputError, match="`deep_cache` must be 1 \\(off\\) with --controlnet"):
        check_options(BenchOptions(target="tiny", controlnets=1, deep_cache=(3,)))
    with pytest.raises(InputError, match="`deep_cache` must be an integer >= 1"):
        check_options(BenchOptions(target="tiny", deep_cache=(0,)))
    with pytest.raises(PackageError, match="--deep-cache"):
        resolve(BenchOptions(target=resolve_builtin("digits"), deep_cache=(1, 2)))


@pytest.mark.slow
def test_bench_measures_the_cached_side_against_the_full_unet(tiny_deep_cache_package, tmp_path):
    from diffrt.bench.runner import BenchOptions, run_benchmark

    record = run_benchmark(BenchOptions(target=str(tiny_deep_cache_package("sd15")), deep_cache=(1, 3), steps=6,
                                        runs=1, warmup=1, threads=1, height=64, width=64))
    sides = record["sides"]
    assert set(sides) == {"diffrt[cpu]", "diffrt[cpu+deep-cache-3]"}
    assert sides["diffrt[cpu+deep-cache-3]"]["info"]["deep_cache_interval"] == 3
    psnr = record["quality"]["diffrt[cpu+deep-cache-3]"]["psnr_vs_first_db"]
    assert psnr != "inf" and 10 < psnr < 100  # a different image, still the same picture


def test_tensorrt_profiles_cover_the_shallow_unet_and_its_feature(tiny_deep_cache_package):
    from diffrt.export.tensorrt import plan_builds

    builds = {build.component.name: build for build in plan_builds(ModelPackage.open(
        tiny_deep_cache_package("sd15")), static=(1, 64, 64))}
    feature = builds[UNET_SHALLOW].profiles[0][DEEP_CACHE_FEATURE]
    assert feature == ((2, 32, 8, 8),) * 3  # CFG batch, the branch's channels, the latent size
