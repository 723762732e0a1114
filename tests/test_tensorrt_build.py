"""TensorRT build and runtime logic that needs no GPU: profiles from sizes, build records and keys, record matching,
atomic engine files, argument errors (library and CLI), and the errors of provider "trt" without TensorRT or CUDA.

Packages are real: the built-in `digits` package (SD-shaped, VAE factor 4, exported for ONNX Runtime: planning reads
only the manifest), the tiny SD 1.5 VAE decoder exported with `target="tensorrt"` here, and the shared SDXL package.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import diffrt
from diffrt.cli import main
from diffrt.errors import ConfigError, EngineError, InputError
from diffrt.export.tensorrt import build_engines, engine_precision, plan_builds
from diffrt.export.tensorrt_profiles import SizeRange, component_profiles, size_requests
from diffrt.package.files import files_sha256, write_bytes
from diffrt.package.reader import ComponentInfo, ModelPackage
from diffrt.package.tensorrt_records import (
    EngineRecord,
    Platform,
    differences,
    engine_record,
    existing,
    onnx_files,
    pick_profile,
    read_records,
    record_key,
    select_records,
    write_engine,
)

REPO = Path(__file__).resolve().parents[1]
DIGITS = Path(diffrt.__file__).parent / "builtin_packages" / "digits"
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
H100 = Platform("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35")


@pytest.fixture(scope="module")
def trt_package(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real `--target tensorrt` export (opset 18): the tiny SD 1.5 VAE decoder only, unvalidated (fast)."""
    from diffrt.export import export_pipeline

    output = tmp_path_factory.mktemp("trt_build") / "sd15_trt"
    return export_pipeline(tiny_checkpoint("sd15"), output, target="tensorrt", components=["vae_decoder"],
                           validate=False)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    """digits: text_encoder, unet, vae_encoder, vae_decoder; VAE factor 4 (three blocks), UNet sample size 8."""
    return ModelPackage.open(DIGITS)


def shapes_of(build, name: str) -> tuple:
    return build.profiles[0][name]


def by_name(builds) -> dict:
    return {build.component.name: build for build in builds}


# ----- profiles from sizes -----
def test_static_size_fixes_every_input_and_cfg_doubles_only_the_unet(package):
    builds = by_name(plan_builds(package, static=(1, 64, 96)))
    context = package.component("unet").inputs[2].shape[2]
    unet = builds["unet"].profiles
    assert len(unet) == 1
    assert unet[0]["sample"] == ((2, 4, 16, 24),) * 3  # 64x96 px / VAE factor 4, batch 1 x 2 for guidance
    assert unet[0]["timestep"] == ((2,),) * 3
    assert unet[0]["encoder_hidden_states"] == ((2, 77, context),) * 3
    assert builds["text_encoder"].profiles == [{"input_ids": ((1, 77),) * 3}]
    assert builds["vae_decoder"].profiles == [{"latent_sample": ((1, 4, 16, 24),) * 3}]
    assert builds["vae_encoder"].profiles == [{"sample": ((1, 3, 64, 96),) * 3}]


def test_dynamic_range_maps_pixels_to_latents_and_keeps_the_minimum_batch_undoubled(package):
    builds = by_name(plan_builds(package, min_size=32, opt_size=(64, 64), max_size=(128, 96), batch=(1, 2, 3)))
    low, opt, high = builds["unet"].profiles[0]["sample"]
    assert (low, opt, high) == ((1, 4, 8, 8), (4, 4, 16, 16), (6, 4, 32, 24))  # guidance 1 fits the minimum
    assert builds["vae_decoder"].profiles[0]["latent_sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (3, 4, 32, 24))
    assert builds["vae_encoder"].profiles[0]["sample"] == ((1, 3, 32, 32), (2, 3, 64, 64), (3, 3, 128, 96))
    assert builds["text_encoder"].profiles[0]["input_ids"] == ((1, 77), (2, 77), (3, 77))


def test_default_range_surrounds_the_models_native_size(package):
    factor = 2 ** (len(package.vae_config["block_out_channels"]) - 1)
    native = package.unet_config["sample_size"] * factor
    (request,) = size_requests(default_size=native, vae_scale_factor=factor)
    assert request.height == request.width == (native // 2, native, native * 3 // 2)
    assert request.batch == (1, 1, 4)


def test_each_bucket_is_its_own_profile_and_identical_profiles_merge(package):
    builds = by_name(plan_builds(package, buckets=[(64, 64), (64, 128)], batch=2))
    assert [p["sample"][0] for p in builds["unet"].profiles] == [(4, 4, 16, 16), (4, 4, 16, 32)]
    assert all(lo == hi for p in builds["unet"].profiles for lo, _, hi in p.values())
    assert len(builds["text_encoder"].profiles) == 1  # both buckets give input_ids (2, 77)


def test_dynamic_range_and_buckets_combine(package):
    builds = by_name(plan_builds(package, max_size=96, buckets=[(128, 128)]))
    assert len(builds["unet"].profiles) == 2
    assert builds["unet"].profiles[1]["sample"][2] == (8, 4, 32, 32)  # bucket 128 px, batch up to 4 x 2


def test_without_cfg_the_unet_batch_is_the_image_batch(package):
    builds = by_name(plan_builds(package, static=(2, 64, 64), cfg=False))
    assert builds["unet"].profiles[0]["sample"][0] == (2, 4, 16, 16)


def test_prompt_chunks_widen_the_sequence_range(package):
    builds = by_name(plan_builds(package, static=(1, 64, 64), prompt_chunks=3))
    low, opt, high = builds["unet"].profiles[0]["encoder_hidden_states"]
    assert (low[1], opt[1], high[1]) == (77, 77, 231)
    with pytest.raises(InputError, match=r"`prompt_chunks` must be within what `unet` was exported for: "
                                         r"`sequence` in \[77, 308\]"):
        plan_builds(package, static=(1, 64, 64), prompt_chunks=5)


@pytest.mark.slow  # exports the shared tiny SDXL package when no other test module has
def test_sdxl_unet_profiles_carry_text_embeds_and_time_ids_with_the_batch(tiny_package):
    sdxl = ModelPackage.open(tiny_package("sdxl"))
    unet = sdxl.component("unet")
    widths = {spec.name: spec.shape[1] for spec in unet.inputs if spec.name in ("text_embeds", "time_ids")}
    request = SizeRange((1, 1, 2), (64, 64, 128), (64, 64, 128))
    (profile,) = component_profiles(unet, [request], vae_scale_factor=8, cfg=True)
    assert profile["text_embeds"] == ((1, widths["text_embeds"]), (2, widths["text_embeds"]),
                                      (4, widths["text_embeds"]))
    assert profile["time_ids"] == ((1, widths["time_ids"]), (2, widths["time_ids"]), (4, widths["time_ids"]))
    assert widths["time_ids"] == 6
    (encoder,) = component_profiles(sdxl.component("text_encoder_2"), [request], vae_scale_factor=8, cfg=True)
    assert encoder == {"input_ids": ((1, 77), (1, 77), (2, 77))}


@pytest.mark.parametrize(("kwargs", "fragments"), [
    ({"max_size": 8192}, ("`max_size` must be within what `unet` was exported for", "`height` in [1, 512] "
                          "latents (4..2048 px)", "8192")),
    ({"static": (20, 64, 64)}, ("`static` must be within what `unet`", "`batch` in [1, 32]", "`batch` 40..40")),
    ({"batch": (1, 1, 40)}, ("`batch` must be within what", "[1, 32]")),
    ({"static": (1, 62, 64)}, ("`static` must be multiples of 4 pixels",)),
    ({"static": (1, 64, 64), "batch": 2}, ("`static` must be used alone", "drop batch")),
    ({"static": (1, 64)}, ("`static` must be (batch, height, width) positive ints",)),
    ({"min_size": 96, "max_size": 64}, ("`min_size, max_size` must be sizes with min <= opt <= max",)),
    ({"batch": (3, 2, 4)}, ("`batch` must be a positive int or (min, opt, max)",)),
    ({"buckets": []}, ("`buckets` must be a non-empty list",)),
    ({"precision": "int8"}, ("`precision` must be None (the package's) or one of fp16, bf16, fp32",)),
    ({"components": ["unet", "refiner"]}, ("`components` must be names from this package's components", "'refiner'")),
    ({"prompt_chunks": 0}, ("`prompt_chunks` must be an int >= 1",)),
    ({"opt_level": 6}, ("`opt_level` must be an int in [0, 5]",)),
    ({"refit": "yes"}, ("`refit` must be True or False",)),
])
def test_argument_errors_name_the_parameter_and_range_before_tensorrt_is_needed(kwargs, fragments):
    with pytest.raises(InputError) as error:  # not the ConfigError of a missing tensorrt: checks come first
        build_engines(DIGITS, **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_a_package_exported_for_onnxruntime_is_refused_before_tensorrt_is_imported():
    with pytest.raises(ConfigError, match=r"`package` must be a package exported with `--target tensorrt`.*"
                                          r"target onnxruntime"):
        build_engines(DIGITS, static=(1, 32, 32))


# ----- precision -----
def component_with_precision(package: ModelPackage, precision: str) -> ComponentInfo:
    unet = package.component("unet")
    return ComponentInfo(unet.name, unet.path, unet.config, {**unet.manifest, "precision": precision})


def test_engine_precision_follows_the_export(package):
    fp32 = package.component("unet")
    assert engine_precision(fp32, "fp16", "fp32") == ("fp16", False, True)  # builder flag, TensorRT chooses
    assert engine_precision(fp32, "fp32", "fp32") == ("fp32", False, False)  # exact float32: no TF32
    assert engine_precision(fp32, "fp16", "fp16") == ("fp32", True, True)  # a float32 island of an fp16 export
    half = component_with_precision(package, "fp16")
    assert engine_precision(half, "fp16", "fp16") == ("fp16", True, True)  # strongly typed
    with pytest.raises(InputError, match=r"`precision` must be 'fp16' for `unet` \(its ONNX is fp16"):
        engine_precision(half, "fp32", "fp16")


# ----- records and keys -----
def record_kwargs(package: ModelPackage) -> dict:
    unet = package.component("unet")
    builds = by_name(plan_builds(package, static=(1, 64, 64)))
    return dict(component="unet", onnx_sha256=files_sha256(onnx_files(unet)), precision="fp16",
                strongly_typed=False, profiles=builds["unet"].profiles, opt_level=3,
                flags={"refit": False, "version_compatible": False, "hardware_compatible": False}, platform=H100,
                diffrt_version="0.1.0")


def test_record_key_is_stable_and_ignores_the_build_block(package):
    kwargs = record_kwargs(package)
    key = record_key(engine_record(**kwargs))
    assert len(key) == 16 and int(key, 16) >= 0
    assert record_key(engine_record(**kwargs)) == key
    record = engine_record(**kwargs)
    assert record_key({**record, "key": key, "build": {"seconds": 12.5, "created": "2026-01-01T00:00:00Z"}}) == key
    assert json.loads(json.dumps(record)) == record  # plain JSON


@pytest.mark.parametrize(("field", "value"), [
    ("onnx_sha256", "0" * 64), ("precision", "fp32"), ("strongly_typed", True), ("opt_level", 5),
    ("flags", {"refit": True, "version_compatible": False, "hardware_compatible": False}),
    ("platform", Platform("NVIDIA A100-SXM4-80GB", "8.0", "10.13.0.35")),
    ("platform", Platform("NVIDIA H100 80GB HBM3", "9.0", "10.14.1.48")), ("diffrt_version", "0.2.0"),
    ("profiles", [{"sample": ((2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 16, 16))}]),
])
def test_record_key_changes_with_each_field(package, field, value):
    kwargs = record_kwargs(package)
    assert record_key(engine_record(**{**kwargs, field: value})) != record_key(engine_record(**kwargs))


def test_onnx_hash_covers_the_graph_and_its_external_weights(package, tmp_path):
    unet = package.component("unet")
    copy = tmp_path / "unet"
    shutil.copytree(unet.folder, copy, ignore=shutil.ignore_patterns("engines"))
    moved = ComponentInfo("unet", copy / unet.path.name, unet.config, unet.manifest)
    files = onnx_files(moved)
    assert files[0] == moved.path
    assert files_sha256(files) == files_sha256(onnx_files(unet))
    assert not (moved.manifest or {}).get("external_data")
    external = copy / "model.onnx_data"
    external.write_bytes(b"weights")  # weights beside the graph count, as the parser reads them
    assert onnx_files(moved) == [moved.path, external]
    changed = files_sha256(onnx_files(moved))
    assert changed != files_sha256(onnx_files(unet))
    data = bytearray(moved.path.read_bytes())
    data[-1] ^= 1
    moved.path.write_bytes(bytes(data))
    assert files_sha256(onnx_files(moved)) != changed


# ----- atomic engine files -----
def test_write_engine_writes_plan_and_record_and_nothing_else(tmp_path):
    path = write_engine(tmp_path / "engines", "abc", b"\x00plan", {"format": "x", "key": "abc"})
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["abc.json", "abc.plan"]
    assert path.with_suffix(".plan").read_bytes() == b"\x00plan"
    assert json.loads(path.read_text()) == {"format": "x", "key": "abc"}


@pytest.mark.parametrize(("plan", "record", "error"), [
    (object(), {"key": "abc"}, TypeError),  # a plan that cannot be written (not bytes-like)
    (b"plan", {"key": "abc", "bad": float("nan")}, ValueError),  # a record that is not strict JSON
])
def test_a_failed_write_leaves_no_temp_files_and_keeps_the_previous_engine(tmp_path, plan, record, error):
    folder = tmp_path / "engines"
    write_engine(folder, "abc", b"old plan", {"key": "abc", "old": True})
    with pytest.raises(error):
        write_engine(folder, "abc", plan, record)
    assert sorted(p.name for p in folder.iterdir()) == ["abc.json", "abc.plan"]
    assert (folder / "abc.plan").read_bytes() == b"old plan"
    assert json.loads((folder / "abc.json").read_text())["old"] is True


def test_write_bytes_atomic_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "cache" / "timing.cache"
    write_bytes(target, b"one")
    write_bytes(target, memoryview(b"two"))
    assert target.read_bytes() == b"two"
    with pytest.raises(TypeError):
        write_bytes(target, 3.5)
    assert [p.name for p in target.parent.iterdir()] == ["timing.cache"] and target.read_bytes() == b"two"


def test_existing_needs_both_files(tmp_path):
    folder = tmp_path / "engines"
    write_engine(folder, "abc", b"plan", {"key": "abc"})
    assert existing(folder, "abc").data == {"key": "abc"}
    (folder / "abc.plan").unlink()
    assert existing(folder, "abc") is None


# ----- record matching (what the runtime checks before deserializing) -----
def store(folder: Path, package: ModelPackage, platform: Platform = H100, plan: bool = True, **flags) -> str:
    kwargs = record_kwargs(package)
    kwargs["flags"] = {**kwargs["flags"], **flags}
    record = engine_record(**{**kwargs, "platform": platform})
    key = record_key(record)
    write_engine(folder, key, b"plan", {**record, "key": key})
    if not plan:
        (folder / f"{key}.plan").unlink()
    return key


def test_a_record_for_this_gpu_and_tensorrt_is_selected(package, tmp_path):
    key = store(tmp_path, package)
    (record,) = select_records(tmp_path, H100, "unet", Path("PKG"))
    assert record.key == key and differences(record, H100) == []


@pytest.mark.parametrize(("built", "fields"), [
    (Platform("NVIDIA A100-SXM4-80GB", "8.0", H100.tensorrt), ("gpu 'NVIDIA A100-SXM4-80GB' (record) vs "
                                                               "'NVIDIA H100 80GB HBM3' (here)", "sm '8.0'")),
    (Platform("NVIDIA H100 PCIe", "9.0", H100.tensorrt), ("gpu 'NVIDIA H100 PCIe' (record)",)),
    (Platform(H100.gpu, H100.sm, "10.12.0.36"), ("tensorrt '10.12.0.36' (record) vs '10.13.0.35' (here)",)),
])
def test_mismatching_records_are_an_error_listing_each_difference(package, tmp_path, built, fields):
    store(tmp_path, package, built)
    with pytest.raises(EngineError) as error:
        select_records(tmp_path, H100, "unet", Path("PKG"))
    message = str(error.value)
    for fragment in (*fields, "diffrt build-engines PKG --rebuild", H100.describe()):
        assert fragment in message
    if "gpu" not in fields[0]:
        assert "gpu '" not in message


def test_hardware_compatible_records_run_on_any_ampere_or_newer_gpu(package, tmp_path):
    store(tmp_path, package, Platform("NVIDIA A100-SXM4-80GB", "8.0", H100.tensorrt), hardware_compatible=True)
    assert len(select_records(tmp_path, H100, "unet", Path("PKG"))) == 1
    turing = Platform("Tesla T4", "7.5", H100.tensorrt)
    with pytest.raises(EngineError, match=r"sm '8.0' \(record\) vs '7.5' \(here\), hardware-compatible"):
        select_records(tmp_path, turing, "unet", Path("PKG"))


@pytest.mark.parametrize(("here", "ok"), [("10.13.0.35", True), ("10.14.1.48", True), ("10.12.0.36", False),
                                          ("11.0.0.1", False)])
def test_version_compatible_records_run_on_the_same_or_a_later_tensorrt_of_that_major(package, tmp_path, here, ok):
    store(tmp_path, package, version_compatible=True)
    platform = Platform(H100.gpu, H100.sm, here)
    if ok:
        assert len(select_records(tmp_path, platform, "unet", Path("PKG"))) == 1
    else:
        with pytest.raises(EngineError, match="version-compatible engines need the same major version"):
            select_records(tmp_path, platform, "unet", Path("PKG"))


def test_no_records_says_to_build_them(tmp_path):
    with pytest.raises(EngineError, match=r"no TensorRT engine for `unet`.*`diffrt build-engines /pkg`"):
        select_records(tmp_path / "engines", H100, "unet", Path("/pkg"))


def test_a_record_without_its_plan_or_unreadable_is_skipped_with_the_reason(package, tmp_path):
    store(tmp_path, package, plan=False, refit=True)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(EngineError) as error:
        select_records(tmp_path, H100, "unet", Path("PKG"))
    assert ".plan missing" in str(error.value) and "broken.json: record 'unreadable" in str(error.value)
    good = store(tmp_path, package)  # a usable record alongside is chosen
    assert [r.key for r in select_records(tmp_path, H100, "unet", Path("PKG"))] == [good]


def profile(low, high, opt=None) -> dict:
    return {"sample": (tuple(low), tuple(opt or low), tuple(high))}


def record_with(tmp_path: Path, name: str, profiles: list, created: str = "2026-01-01T00:00:00Z") -> EngineRecord:
    from diffrt.package.tensorrt_records import profiles_to_record

    data = {"profiles": profiles_to_record(profiles), "build": {"created": created}}
    return EngineRecord(tmp_path / f"{name}.json", data)


def test_pick_profile_prefers_an_exact_profile_then_the_narrowest_then_the_newest(tmp_path):
    dynamic = record_with(tmp_path, "dyn", [profile((1, 4, 4, 4), (8, 4, 32, 32), (2, 4, 8, 8))])
    buckets = record_with(tmp_path, "buckets", [profile((2, 4, 16, 16), (2, 4, 16, 16)),
                                                profile((2, 4, 8, 8), (2, 4, 8, 8))])
    assert pick_profile([dynamic, buckets], {"sample": (2, 4, 8, 8)}) == (buckets, 1)
    assert pick_profile([dynamic, buckets], {"sample": (2, 4, 12, 12)}) == (dynamic, 0)
    assert pick_profile([dynamic, buckets], {"sample": (2, 4, 64, 64)}) is None
    assert pick_profile([dynamic], {"sample": (2, 4, 8)}) is None  # another rank
    newer = record_with(tmp_path, "newer", dynamic.profiles, created="2026-06-01T00:00:00Z")
    assert pick_profile([dynamic, newer], {"sample": (2, 4, 12, 12)}) == (newer, 0)


def test_read_records_lists_json_files_in_order(package, tmp_path):
    keys = sorted([store(tmp_path, package), store(tmp_path, package, hardware_compatible=True)])
    assert [r.key for r in read_records(tmp_path)] == keys


# ----- CLI -----
def one_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffrt build-engines: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--static", "1x64"], ("--static", "BATCHxHEIGHTxWIDTH", "'1x64'")),
    (["--opt-level", "9"], ("--opt-level", "[0, 5]", "'9'")),
    (["--batch", "1:2"], ("--batch", "MIN:OPT:MAX", "'1:2'")),
    (["--max-size", "0"], ("--max-size", "positive integers", "'0'")),
    (["--prompt-chunks", "5"], ("--prompt-chunks", "[1, 4]")),
    (["--precision", "int8"], ("--precision", "invalid choice")),
])
def test_malformed_options_exit_2_with_one_line(capsys, extra, fragments):
    with pytest.raises(SystemExit) as exit_info:
        main(["build-engines", str(DIGITS), *extra])
    assert exit_info.value.code == 2
    one_line(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--static", "1x64x64", "--batch", "2"], ("`--static`", "--batch")),
    (["--max-size", "8192x64"], ("`--max-size` must be within what `unet` was exported for", "[1, 512]")),
    (["--bucket", "64x62"], ("`--bucket` must be multiples of 4 pixels",)),
    (["--batch", "1:1:64"], ("`--batch` must be within what", "[1, 32]")),
    (["--components", "unet,refiner"], ("`--components` must be names from", "'refiner'")),
])
def test_out_of_range_options_exit_2_naming_the_option(capsys, extra, fragments):
    assert main(["build-engines", str(DIGITS), *extra]) == 2
    one_line(capsys.readouterr().err, *fragments)


def test_export_tensorrt_flag_needs_the_tensorrt_target(tiny_checkpoint, tmp_path, capsys):
    code = main(["export", str(tiny_checkpoint("sd15")), str(tmp_path / "out"), "--tensorrt"])
    assert code == 2
    err = capsys.readouterr().err
    assert "`--tensorrt` builds engines from a `--target tensorrt` export" in err
    assert not (tmp_path / "out").exists()


def test_generate_cuda_graph_needs_a_gpu_provider(tmp_path, capsys):
    code = main(["generate", "digits", "a seven", "--cuda-graph", "-o", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("diffrt generate: error: `--cuda-graph` needs `--provider cuda` or `--provider trt`; got "
                   "--provider 'cpu'"), err
    assert not (tmp_path / "x.png").exists()


# ----- without TensorRT / CUDA -----
@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_build_without_tensorrt_is_a_config_error_naming_the_extra(trt_package, capsys):
    with pytest.raises(ConfigError, match=r"needs the tensorrt package.*pip install 'diffrt\[tensorrt\]'"):
        build_engines(trt_package, static=(1, 64, 64))  # a valid request on a --target tensorrt package
    assert main(["build-engines", str(trt_package)]) == 2
    one_line(capsys.readouterr().err, "pip install 'diffrt[tensorrt]'")
    assert not list(trt_package.glob("*/engines"))


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_provider_trt_without_tensorrt_is_a_clear_error(package):
    from diffrt.runtime.engines import check_provider, create_engine
    from diffrt.runtime.pipelines.base import DiffusionPipeline

    with pytest.raises(ConfigError, match=r"provider 'trt' \(native TensorRT\).*pip install 'diffrt\[tensorrt\]'"):
        check_provider("trt")
    with pytest.raises(ValueError, match=r"provider 'trt'.*diffrt\[tensorrt\]"):
        DiffusionPipeline.from_pretrained(package.root, provider="trt", cuda_graph=True)
    with pytest.raises(ConfigError, match="provider 'trt'"):
        create_engine(package.component("unet"), provider="trt")


def test_without_a_gpu_cuda_is_a_clear_engine_error():
    from diffrt.runtime.engines import cuda

    try:
        runtime = cuda.cudart()
    except ConfigError:
        pytest.skip("cuda-python is not installed (the ConfigError tests cover that)")
    error, count = runtime.cudaGetDeviceCount()
    if error == runtime.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(EngineError, match="provider 'trt' needs an NVIDIA GPU"):
        cuda.require_device(0)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"inference_precision": "fp16"}, "`inference_precision` is not an option of provider 'trt' (TensorRTEngine)"),
    ({"max_contexts": 0}, "`max_contexts` must be an int >= 1"),
    ({"device_id": -1}, "`device_id` must be an int >= 0"),
    ({"cuda_graph": "yes"}, "`cuda_graph` must be True or False"),
])
def test_trt_engine_options_are_checked_before_anything_loads(package, options, fragment):
    from diffrt.runtime.engines import create_engine

    with pytest.raises(ConfigError) as error:
        create_engine(package.component("unet"), provider="trt", **options)
    assert fragment in str(error.value)


def test_the_trt_runtime_modules_import_no_torch_and_no_tensorrt():
    code = ("import sys, diffrt.runtime.engines.tensorrt, diffrt.runtime.engines.cuda; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers', 'tensorrt', 'pycuda', 'polygraphy') "
            "if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_building_engines_imports_no_torch():
    """`diffrt build-engines` runs on the GPU box, which has the package and TensorRT but not the export extra."""
    code = ("import sys, diffrt.export.tensorrt, diffrt.cli.build_engines, diffrt.cli; "
            "from diffrt.export import build_engines; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers', 'onnxscript') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_results_are_caller_owned_copies_with_float_outputs_as_float32():
    from diffrt.runtime.engines.tensorrt import _to_result

    staged = np.arange(6, dtype=np.float16).reshape(2, 3)
    result = _to_result(staged)
    assert result.dtype == np.float32 and np.array_equal(result, staged.astype(np.float32))
    ids = np.arange(4, dtype=np.int64)
    copy = _to_result(ids)
    copy[0] = 9
    assert ids[0] == 0 and copy.dtype == np.int64


# ----- adapters on provider "trt": plans built refittable -----
def test_adapters_on_trt_need_refittable_plans_and_say_so_before_loading(tmp_path):
    """LoRA and textual inversion go through TensorRT refit: plans built without --refit are refused by component,
    with the command that rebuilds them, before TensorRT is imported (tests/test_tensorrt_gpu.py runs the refit)."""
    from diffrt.runtime.engines import check_initializer_overrides

    root = tmp_path / "digits"
    shutil.copytree(DIGITS, root)
    package = ModelPackage.open(root)
    engines = root / "unet" / "engines"
    store(engines, package, refit=False)
    with pytest.raises(ConfigError, match=r"engines of unet in .* were built without --refit: rebuild them with "
                                          r"`diffrt build-engines .* --rebuild --refit`"):
        check_initializer_overrides("trt", package, ["text_encoder", "unet"])
    check_initializer_overrides("trt", package, ["text_encoder"])  # the UNet's plans are not the adapters' business
    check_initializer_overrides("cpu", package, ["unet"])  # ONNX Runtime and OpenVINO replace initializers themselves
    check_initializer_overrides("openvino", package, ["unet"])
    shutil.rmtree(engines)
    store(engines, package, refit=True)
    check_initializer_overrides("trt", package, ["text_encoder", "unet"])


def test_refit_hands_tensorrt_package_weights_with_numpys_own_dtype_objects():
    """TensorRT's `trt.Weights(array)` matches the dtype by object identity (its pybind11 `dtype.is`): the weights
    diffrt memory-maps from a package carry an equal but distinct '<f4', which it would refuse. The refit hands it
    a view with NumPy's own dtype object: the same memory, the same values."""
    from diffrt.package.weights import read_initializers
    from diffrt.runtime.engines.tensorrt_refit import plain_dtype

    mapped = read_initializers(DIGITS / "unet" / "model.onnx", None)
    name, weight = next((n, w) for n, w in mapped.items() if w.ndim == 2)
    assert weight.dtype == np.float32 and weight.dtype is not np.dtype("float32"), "the premise changed"
    plain = plain_dtype(weight)
    assert plain.dtype is np.dtype("float32") and np.shares_memory(plain, weight)
    np.testing.assert_array_equal(plain, weight)
    half = plain_dtype(weight.astype(np.dtype("float16").newbyteorder("<")).T)  # and a transposed view is packed
    assert half.dtype is np.dtype("float16") and half.flags.c_contiguous
    np.testing.assert_array_equal(half, weight.astype(np.float16).T)
