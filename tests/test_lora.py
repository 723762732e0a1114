"""LoRA on exported packages, torch-free, against Diffusers' own LoRA loading (issue #15).

The LoRA files are built for real with PEFT and saved with Diffusers' `save_lora_weights` (tests/lora_files.py),
or rewritten in kohya's naming; Diffusers loads the same file with `load_lora_weights` + `set_adapters` /
`fuse_lora`. Tolerance: max abs diff <= 1e-3 on images in [0, 1], as every pipeline parity test
(tests/test_runtime_pipelines.py); after unloading, the image equals the base model's exactly.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from lora_files import kohya_lora, peft_lora  # noqa: E402

from diffrt.errors import ConfigError, ExportError, InputError, PackageError  # noqa: E402
from diffrt.package.weights import from_initializer, parameter_placements, read_initializers  # noqa: E402
from diffrt.runtime import DiffusionPipeline  # noqa: E402

TOL = 1e-3
CALL = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, lora_dir):
    """`loras(kind, fmt, seed)` -> a LoRA file for the tiny `kind` checkpoint, built once."""
    built = {}

    def get(kind, fmt="peft", seed=1, **options):
        key = (kind, fmt, seed, tuple(sorted(options.items())))
        if key not in built:
            folder = lora_dir / f"{kind}-{seed}-{len(built)}"
            path = peft_lora(tiny_checkpoint(kind), kind, folder, seed, **options)
            layers = json.loads((tiny_checkpoint(kind) / "unet" / "config.json").read_text())["layers_per_block"]
            if fmt != "peft":
                sgm = layers if fmt == "kohya-sgm" else None
                path = kohya_lora(path, kind, folder / "kohya.safetensors", sgm_layers_per_block=sgm)
            built[key] = path
        return built[key]

    return get


def reference(tiny_checkpoint, kind):
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(kind))
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(tiny_package, kind, **options):
    from diffrt.schedulers import EulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(tiny_package(kind), **options)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_of(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed) if isinstance(pipe, diffusers.DiffusionPipeline) else seed
    return np.asarray(pipe(generator=generator, **CALL).images)


def assert_close(expected, got):
    diff = float(np.abs(expected - got).max())
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL:.0e}"


# ----- the export's parameter map -----
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_export_maps_every_adaptable_weight_onto_its_initializer(kind, tiny_checkpoint, tiny_package):
    """Each Linear / Conv / embedding weight of the UNet and text encoders is found, and reading its initializer
    back in the recorded layout gives Diffusers' parameter bit for bit."""
    ref = reference(tiny_checkpoint, kind)
    manifest = json.loads((tiny_package(kind) / "diffrt.json").read_text())
    names = ["unet", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    for name in names:
        placements = parameter_placements(name, manifest["components"][name])
        state = {k if name == "unet" or k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                 for k, v in getattr(ref, name).state_dict().items()}
        wanted = [k for k, v in state.items() if v.ndim >= 2]
        assert sorted(set(wanted) - set(placements)) == []
        files = read_initializers(tiny_package(kind) / name / "model.onnx",
                                  {p.initializer for k in wanted for p in placements[k]})
        for key in wanted:
            for place in placements[key]:
                value = from_initializer(files[place.initializer], place.layout, tuple(state[key].shape))
                np.testing.assert_array_equal(value, state[key].numpy(), err_msg=f"{name} {key}")


# ----- parity with Diffusers -----
@pytest.mark.parametrize(("kind", "fmt"), [("sd15", "peft"), ("sd15", "kohya"), ("sdxl", "peft"), ("sdxl", "kohya"),
                                           ("sdxl", "kohya-sgm")])
def test_lora_image_matches_diffusers(kind, fmt, tiny_checkpoint, tiny_package, loras):
    """kohya-sgm: UNet modules in the original SGM block names (`input_blocks_4_1_...`), with the resnets' 3x3
    convolutions too (LoCon), as kohya's SDXL trainer names them (SD 1.x kohya files use Diffusers' names)."""
    path = loras(kind, fmt, conv=fmt == "kohya-sgm")
    ref = reference(tiny_checkpoint, kind)
    ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="style")
    pipe = ours(tiny_package, kind)
    pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="style")
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["style"]
    expected, got = image_of(ref), image_of(pipe)
    assert_close(expected, got)
    assert float(np.abs(got - image_of(ours(tiny_package, kind))).max()) > 10 * TOL  # the LoRA changed the image


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_two_adapters_at_different_weights_match_diffusers(kind, tiny_checkpoint, tiny_package, loras):
    first, second = loras(kind, "peft", seed=1), loras(kind, "kohya", seed=2)
    ref = reference(tiny_checkpoint, kind)
    pipe = ours(tiny_package, kind)
    for target in (ref, pipe):
        target.load_lora_weights(str(first), adapter_name="a")
        target.load_lora_weights(str(second), adapter_name="b")
        target.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    assert pipe.get_active_adapters() == ref.get_active_adapters() == ["a", "b"]
    assert_close(image_of(ref), image_of(pipe))


def test_locon_conv_lora_matches_diffusers(tiny_checkpoint, tiny_package, loras):
    """LoCon: low-rank updates of the resnets' 3x3 convolutions (down [r, in, 3, 3], up [out, r, 1, 1])."""
    path = loras("sd15", "kohya", seed=3, conv=True)  # diffusers' module names
    ref = reference(tiny_checkpoint, "sd15")
    ref.load_lora_weights(str(path))
    pipe = ours(tiny_package, "sd15")
    pipe.load_lora_weights(path)
    assert_close(image_of(ref), image_of(pipe))


def test_sessions_without_the_nchwc_layout_pass_still_match_diffusers(tiny_checkpoint, tiny_package, loras):
    """`disabled_optimizers=["NchwcTransformer"]` (the fast-switch setting, docs/adapters.md) reaches every session
    and leaves the adapted image Diffusers' (a LoCon file: convolutions are what that pass reorders)."""
    path = loras("sd15", "kohya", seed=3, conv=True)
    ref = reference(tiny_checkpoint, "sd15")
    ref.load_lora_weights(str(path))
    pipe = ours(tiny_package, "sd15", disabled_optimizers=["NchwcTransformer"])
    pipe.load_lora_weights(path)
    assert_close(image_of(ref), image_of(pipe))
    assert pipe.engine("unet").disabled_optimizers == ["NchwcTransformer"]


def test_fuse_lora_matches_diffusers_and_survives_unload(tiny_checkpoint, tiny_package, loras):
    path = loras("sd15", "peft")
    ref = reference(tiny_checkpoint, "sd15")
    pipe = ours(tiny_package, "sd15")
    for target in (ref, pipe):
        target.load_lora_weights(str(path), adapter_name="a")
        target.fuse_lora(lora_scale=0.6)
        target.unload_lora_weights()
    assert pipe.get_active_adapters() == []
    assert_close(image_of(ref), image_of(pipe))
    pipe.unfuse_lora()
    np.testing.assert_array_equal(image_of(pipe), image_of(ours(tiny_package, "sd15")))


def test_unload_and_disable_give_the_base_image_exactly(tiny_package, loras):
    pipe = ours(tiny_package, "sd15")
    base = image_of(pipe)
    pipe.load_lora_weights(loras("sd15", "peft"), adapter_name="a")
    with_lora = image_of(pipe)
    pipe.disable_lora()
    assert pipe.get_active_adapters() == []
    np.testing.assert_array_equal(image_of(pipe), base)
    pipe.enable_lora()
    np.testing.assert_array_equal(image_of(pipe), with_lora)
    pipe.set_adapters("a", adapter_weights=0.0)
    np.testing.assert_array_equal(image_of(pipe), base)
    pipe.set_adapters("a", adapter_weights=1.0)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    np.testing.assert_array_equal(image_of(pipe), base)


def test_switching_recreates_only_the_sessions_whose_weights_change(tiny_package, loras):
    pipe = ours(tiny_package, "sd15", load="eager")
    before = dict(pipe._engines)
    pipe.load_lora_weights(loras("sd15", "peft", text_encoders=False), adapter_name="unet_only")
    assert pipe._engines["unet"] is not before["unet"]
    assert pipe._engines["text_encoder"] is before["text_encoder"]
    assert pipe._engines["vae_decoder"] is before["vae_decoder"]
    unet = pipe._engines["unet"]
    pipe.set_adapters("unet_only", adapter_weights=1.0)  # the same weights again: nothing to re-create
    assert pipe._engines["unet"] is unet


def test_per_component_weights_follow_diffusers(tiny_checkpoint, tiny_package, loras):
    path = loras("sd15", "peft")
    ref = reference(tiny_checkpoint, "sd15")
    pipe = ours(tiny_package, "sd15")
    weights = {"unet": 0.5, "text_encoder": 0.0}
    for target in (ref, pipe):
        target.load_lora_weights(str(path), adapter_name="a")
        target.set_adapters("a", adapter_weights=weights)
    assert_close(image_of(ref), image_of(pipe))


# ----- refusals -----
def test_keys_matching_no_weight_are_an_error_listing_them_or_a_warning_when_lenient(
        tiny_package, loras, tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(loras("sd15", "kohya")))
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = np.ones((4, 8), np.float32)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = np.ones((8, 4), np.float32)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    pipe = ours(tiny_package, "sd15")
    with pytest.raises(InputError, match=r"1 keys match no weight.*lora_unet_no_such_block_to_q.*strict=False"):
        pipe.load_lora_weights(path)
    assert pipe.get_list_adapters() == {}
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(path, strict=False)
    assert "skipped 1 keys" in caplog.text


def test_sdxl_lora_on_an_sd15_package_is_refused(tiny_package, loras):
    with pytest.raises(InputError, match="another model family"):
        ours(tiny_package, "sd15").load_lora_weights(loras("sdxl", "kohya"))


def test_pickles_and_unsupported_lycoris_algorithms_are_refused(tiny_package, tmp_path):
    from safetensors.numpy import save_file

    pipe = ours(tiny_package, "sd15")
    pickle = tmp_path / "lora.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(InputError, match="only as safetensors"):
        pipe.load_lora_weights(pickle)
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": np.ones((2, 2), np.float32)}, str(loha))
    with pytest.raises(InputError, match="LoHa"):
        pipe.load_lora_weights(loha)
    with pytest.raises(InputError, match="no pytorch_lora_weights.safetensors"):
        pipe.load_lora_weights(tmp_path)


def test_a_package_without_the_parameter_map_says_to_re_export(tiny_package, loras, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_package("sd15"), copy)
    manifest = json.loads((copy / "diffrt.json").read_text())
    for entry in manifest["components"].values():
        entry.pop("parameters", None)
    (copy / "diffrt.json").write_text(json.dumps(manifest))
    pipe = DiffusionPipeline.from_pretrained(copy)
    with pytest.raises(PackageError, match="re-export"):
        pipe.load_lora_weights(loras("sd15", "peft"))


def test_adapters_on_a_bf16_package_are_refused_naming_the_precision(tiny_checkpoint, tmp_path):
    """NumPy has no bfloat16: a bf16 package's weights are read as their bits, and adding a LoRA delta to those
    would write garbage weights, so adapters refuse such a component and say which precisions work."""
    from diffrt.export import export_pipeline
    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.adapters.package_weights import PackageWeights

    package = export_pipeline(tiny_checkpoint("sd15"), tmp_path / "bf16", precision="bf16", opset=22,
                              components=["text_encoder"], validate=False)
    weights = PackageWeights(ModelPackage.open(package))
    with pytest.raises(ConfigError, match=r"need fp32 or fp16 weights; the text_encoder of .* is bf16: re-export "
                                          r"it with --precision fp16 or fp32"):
        weights.placements("text_encoder")


def test_the_map_of_an_older_package_is_derived_from_its_checkpoint_exactly(tiny_checkpoint, tiny_package, tmp_path):
    from diffrt.export import add_parameter_maps

    copy = tmp_path / "old"
    shutil.copytree(tiny_package("sd15"), copy)
    manifest = json.loads((copy / "diffrt.json").read_text())
    for entry in manifest["components"].values():
        entry.pop("parameters", None)
    (copy / "diffrt.json").write_text(json.dumps(manifest))
    counts = add_parameter_maps(tiny_checkpoint("sd15"), copy)
    original = json.loads((tiny_package("sd15") / "diffrt.json").read_text())["components"]
    derived = json.loads((copy / "diffrt.json").read_text())["components"]
    assert set(counts) == {"unet", "text_encoder"}
    for name in counts:
        assert derived[name]["parameters"] == original[name]["parameters"]
    with pytest.raises(ExportError, match="not its source checkpoint"):
        add_parameter_maps(tiny_checkpoint("sdxl"), copy)


@pytest.mark.parametrize(("kind", "fmt"), [("sd15", "kohya"), ("sdxl", "kohya-sgm")])
def test_openvino_applies_adapters_as_onnx_runtime_does(kind, fmt, tiny_checkpoint, tiny_package, loras):
    """OpenVINO swaps the adapted initializers into its read model: two adapters (one with LoCon convolutions on
    SDXL) give Diffusers' image, and unloading gives OpenVINO's base image exactly."""
    pytest.importorskip("openvino")
    first, second = loras(kind, fmt, seed=1, conv=fmt == "kohya-sgm"), loras(kind, "peft", seed=2)
    ref = reference(tiny_checkpoint, kind)
    pipe = ours(tiny_package, kind, provider="openvino")
    base = image_of(pipe)
    for target in (ref, pipe):
        target.load_lora_weights(str(first), adapter_name="a")
        target.load_lora_weights(str(second), adapter_name="b")
        target.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    adapted = image_of(pipe)
    assert_close(image_of(ref), adapted)
    assert float(np.abs(adapted - base).max()) > 10 * TOL  # the adapters changed OpenVINO's image
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(image_of(pipe), base)


def test_bad_adapter_arguments_name_the_parameter(tiny_package, loras):
    pipe = ours(tiny_package, "sd15")
    pipe.load_lora_weights(loras("sd15", "peft"), adapter_name="a")
    with pytest.raises(InputError, match="adapter_names"):
        pipe.set_adapters(["b"])
    with pytest.raises(InputError, match="adapter_weights"):
        pipe.set_adapters(["a"], adapter_weights=[float("nan")])
    with pytest.raises(InputError, match="adapter_weights"):
        pipe.set_adapters(["a"], adapter_weights=[1.0, 2.0])
    with pytest.raises(InputError, match="adapter_name"):
        pipe.load_lora_weights(loras("sd15", "peft"), adapter_name="a")


# ----- command line -----
def test_cli_lora_with_scales_makes_the_python_api_image(tiny_package, loras, tmp_path):
    from cli_runner import one_line_error, run_cli
    from PIL import Image

    first, second = loras("sd15", "peft", seed=1), loras("sd15", "kohya", seed=2)
    args = ["generate", tiny_package("sd15"), "a photo of a cat", "--steps", "3", "--height", "64", "--width", "64",
            "--seed", "5", "--scheduler", "Euler", "--lora", f"{first}:0.7", "--lora", f"{second}:-0.4"]
    result = run_cli(*args, "-o", tmp_path / "cli.png")
    assert result.returncode == 0, result.stderr
    got = np.asarray(Image.open(tmp_path / "cli.png"), dtype=np.float32) / 255
    pipe = ours(tiny_package, "sd15")
    pipe.load_lora_weights(first, adapter_name="a")
    pipe.load_lora_weights(second, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    expected = np.asarray(pipe(generator=5, **CALL).images[0])
    assert float(np.abs(expected - got).max()) <= 1 / 255 + 1e-6  # 8-bit PNG rounding
    record = json.loads(Image.open(tmp_path / "cli.png").text["diffrt"])  # diffrt's record in the PNG
    assert record["loras"] == [{"path": str(first), "scale": 0.7}, {"path": str(second), "scale": -0.4}]
    missing = run_cli(*args[:-4], "--lora", str(tmp_path / "none.safetensors:0.5"), "-o", tmp_path / "x.png")
    assert missing.returncode != 0
    one_line_error(missing.stderr, "generate", "none.safetensors does not exist")
