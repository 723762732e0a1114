"""ControlNets in model packages: `diffrt export --controlnet` and `--into`, the manifest and index they write, the
UNet's residual inputs (only in packages with ControlNets), and the checks made before anything is exported."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from checkpoint_fixtures import CONTROLNET_PACKAGES
from cli_runner import run_cli
from PIL import Image

from diffrt.cli import main
from diffrt.errors import ConfigError, InputError
from diffrt.export import add_controlnets, export_pipeline
from diffrt.package.files import read_json
from diffrt.package.names import ONNX_ENTRY
from diffrt.package.reader import ModelPackage
from diffrt.runtime import DiffusionPipeline

PROMPT = "a cat"


def control_picture(path: Path, seed: int = 1) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def residual_inputs(package: Path) -> list[str]:
    inputs = read_json(package / "diffrt.json")["components"]["unet"]["inputs"]
    return [spec["name"] for spec in inputs if "residual" in spec["name"]]


def test_plain_package_keeps_the_plain_unet(tiny_package):
    assert residual_inputs(tiny_package("sd15")) == []


def test_controlnet_package_manifest_index_and_graphs(tiny_controlnet_package, tiny_controlnet):
    package = tiny_controlnet_package("sd15")
    manifest, index = read_json(package / "diffrt.json"), read_json(package / "model_index.json")
    assert manifest["pipeline"] == index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["controlnet_pose"] == index["controlnet_depth"] == list(ONNX_ENTRY)
    # tiny UNet: 2 levels, 1 layer per block -> skips conv_in, down0 layer, down0 downsampler, down1 layer; then mid
    assert residual_inputs(package) == [f"down_block_additional_residual_{i}" for i in range(4)] + [
        "mid_block_additional_residual"]
    pose = manifest["components"]["controlnet_pose"]
    assert [spec["name"] for spec in pose["inputs"]] == ["sample", "timestep", "encoder_hidden_states",
                                                          "controlnet_cond"]
    assert pose["outputs"][-1] == {"name": "mid_block_res_sample", "dtype": "float32",
                                   "shape": ["batch", 64, "height_1", "width_1"]}
    assert pose["dims"]["image_height"] == [8, 4096] and pose["dims"]["height_1"] == [1, 256]
    assert 0 <= pose["validation"]["max_abs_diff"] <= pose["validation"]["tolerance"]
    assert pose["source"]["id"].endswith(str(tiny_controlnet(CONTROLNET_PACKAGES["sd15"][0])))
    opened = ModelPackage.open(package)
    assert {"controlnet_pose", "controlnet_depth", "unet"} <= set(opened.components)


def test_sdxl_controlnet_takes_the_text_time_conditioning(tiny_controlnet_package):
    manifest = read_json(tiny_controlnet_package("sdxl") / "diffrt.json")
    assert manifest["pipeline"] == "StableDiffusionXLControlNetPipeline"
    names = [spec["name"] for spec in manifest["components"]["controlnet_pose"]["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "controlnet_cond"]


def test_a_controlnet_for_another_family_is_refused_before_export(tiny_checkpoint, tiny_controlnet, tmp_path):
    with pytest.raises(ConfigError, match="does not fit this UNet: its `block_out_channels`|cross_attention_dim"):
        export_pipeline(tiny_checkpoint("sd15"), tmp_path / "out", controlnets=[tiny_controlnet("cn_sdxl")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("specs, message", [
    (["bad name=x"], "`controlnet` must be a name of letters"),
    (["a=/does/not/exist"], "`controlnet` must be a ControlNetModel folder"),
])
def test_bad_controlnet_sources_name_the_argument(specs, message, tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match=message):
        export_pipeline(tiny_checkpoint("sd15"), tmp_path / "out", controlnets=specs)


def test_two_controlnets_need_two_names(tiny_checkpoint, tiny_controlnet, tmp_path):
    folder = tiny_controlnet("cn_sd15")
    with pytest.raises(InputError, match="different names"):
        export_pipeline(tiny_checkpoint("sd15"), tmp_path / "out", controlnets=[folder, f"{folder.name}={folder}"])


def test_into_a_plain_package_exports_its_unet_again_and_matches(tiny_package, tiny_controlnet,
                                                                 tiny_controlnet_package, tmp_path):
    """`--into` a package without residual inputs: the UNet is exported again from the recorded checkpoint, and the
    result draws the same image as the package exported with the ControlNet from the start."""
    package = tmp_path / "pkg"
    shutil.copytree(tiny_package("sd15"), package)
    result = run_cli("export", "--controlnet", f"pose={tiny_controlnet('cn_sd15')}", "--into", package)
    assert result.returncode == 0, result.stderr
    assert len(residual_inputs(package)) == 5
    assert read_json(package / "model_index.json")["_class_name"] == "StableDiffusionControlNetPipeline"
    assert not [p.name for p in package.iterdir() if p.name.startswith(".")]  # no temp folders left
    image = Image.open(control_picture(tmp_path / "pose.png"))
    images = []
    for folder in (package, tiny_controlnet_package("sd15")):
        pipe = DiffusionPipeline.from_pretrained(folder, controlnet="pose")
        images.append(pipe(PROMPT, image=image, num_inference_steps=2, generator=0, output_type="np").images)
    assert np.abs(images[0] - images[1]).max() <= 1e-5
    refused = run_cli("export", "--controlnet", f"pose={tiny_controlnet('cn_sd15')}", "--into", package)
    assert refused.returncode == 2 and "without controlnet_pose" in refused.stderr


def test_cli_generate_with_a_controlnet(tiny_controlnet_package, tmp_path):
    package = tiny_controlnet_package("sd15")
    control_picture(tmp_path / "pose.png")
    result = run_cli("generate", package, PROMPT, "--controlnet", "pose", "--control-image", "pose.png",
                     "--control-scale", "0.8", "--steps", "2", "--seed", "3", "-o", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pipe = DiffusionPipeline.from_pretrained(package, controlnet="pose")
    expected = pipe(PROMPT, image=Image.open(tmp_path / "pose.png").convert("RGB"), controlnet_conditioning_scale=0.8,
                    num_inference_steps=2, generator=[3]).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(expected))
    record = json.loads(Image.open(tmp_path / "out.png").text["diffrt"])
    assert record["controlnet"] == ["pose"] and record["control_image"] == ["pose.png"]
    assert record["controlnet_conditioning_scale"] == 0.8 and record["guess_mode"] is False
    plain = run_cli("generate", package, PROMPT, "--steps", "2", "--height", "64", "--width", "64", "-o", "p.png",
                    cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr  # a ControlNet package also runs without its ControlNets


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "PKG", "p", "--control-image", "x.png"], "`--control-image` needs `--controlnet NAME`"),
    (["generate", "PKG", "p", "--controlnet", "a", "--controlnet", "b", "--control-image", "x.png"],
     "one `--control-image` per `--controlnet`"),
    (["generate", "PKG", "p", "--controlnet", "a", "--control-image", "x.png", "--control-scale", "1",
      "--control-scale", "2"], "`--control-scale` once"),
])
def test_cli_controlnet_argument_errors_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_cli_control_scale_must_be_a_number(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "PKG", "p", "--controlnet", "a", "--control-image", "x.png", "--control-scale", "nan"])
    assert exit_.value.code == 2 and "--control-scale: expected a number >= 0" in capsys.readouterr().err


def test_add_controlnets_to_a_package_that_has_residuals_exports_only_the_controlnet(
        tiny_controlnet_package, tiny_controlnet, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_controlnet_package("sd15"), package)
    unet_before = (package / "unet" / "model.onnx").read_bytes()
    add_controlnets(package, [f"extra={tiny_controlnet('cn_sd15_b')}"], validate=False)
    assert (package / "unet" / "model.onnx").read_bytes() == unet_before
    pipe = DiffusionPipeline.from_pretrained(package)
    assert pipe.controlnet_names == ["pose", "depth", "extra"]


def test_tensorrt_profiles_size_the_residuals_and_the_control_image(tiny_controlnet_package):
    """Profiles need no GPU: each residual is the UNet's level-k map (ceil(latent / 2**k)), the control image is in
    pixels, and the ControlNet's minimum batch stays undoubled (guess mode runs the conditional half only)."""
    from diffrt.export.tensorrt_profiles import component_profiles, size_requests

    package = ModelPackage.open(tiny_controlnet_package("sd15"))
    static = size_requests(static=(1, 72, 64), default_size=64, vae_scale_factor=8)
    unet = component_profiles(package.component("unet"), static, vae_scale_factor=8, cfg=True)[0]
    assert unet["sample"] == ((2, 4, 9, 8),) * 3
    assert unet["down_block_additional_residual_0"] == ((2, 32, 9, 8),) * 3
    assert unet["down_block_additional_residual_3"] == ((2, 64, 5, 4),) * 3  # ceil(9 / 2) x ceil(8 / 2)
    assert unet["mid_block_additional_residual"] == ((2, 64, 5, 4),) * 3
    dynamic = size_requests(min_size=64, opt_size=64, max_size=(128, 96), batch=(1, 2, 3), default_size=64,
                            vae_scale_factor=8)
    pose = component_profiles(package.component("controlnet_pose"), dynamic, vae_scale_factor=8, cfg=True)[0]
    assert pose["controlnet_cond"] == ((1, 3, 64, 64), (4, 3, 64, 64), (6, 3, 128, 96))
    assert pose["sample"] == ((1, 4, 8, 8), (4, 4, 8, 8), (6, 4, 16, 12))
    assert set(pose) == {"sample", "timestep", "encoder_hidden_states", "controlnet_cond"}


def test_a1111_api_runs_controlnet_units_and_plain_requests(tiny_controlnet_package, tmp_path):
    """A served ControlNet package: `alwayson_scripts.controlnet` units (the real webuiapi client's ControlNetUnit)
    give the image our pipeline makes with the same arguments; a request without units runs the plain pipeline; a
    unit asking for a preprocessor is refused naming its field."""
    import webuiapi
    from serve_helpers import app_server

    from diffrt.runtime.generation import scheduler_for
    from diffrt.serve.config import ServeConfig

    package = tiny_controlnet_package("sd15")
    pose = Image.open(control_picture(tmp_path / "pose.png")).convert("RGB")
    unit = webuiapi.ControlNetUnit(image=pose, module="none", model="pose [0123abcd]", weight=0.7,
                                   guidance_end=0.5)
    with app_server(ServeConfig(packages=[str(package)], max_batch=1)) as (base_url, _):
        host, port = base_url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        # webuiapi fills its default `alwayson_scripts` dict in place: pass fresh ones, so no unit leaks
        controlled = api.txt2img(prompt=PROMPT, width=64, height=64, steps=2, seed=5, controlnet_units=[unit],
                                 alwayson_scripts={})
        plain = api.txt2img(prompt=PROMPT, width=64, height=64, steps=2, seed=5, alwayson_scripts={})
        refused = httpx.post(f"{base_url}/sdapi/v1/txt2img", json={
            "prompt": PROMPT, "width": 64, "height": 64, "steps": 2,
            "alwayson_scripts": {"controlnet": {"args": [{**unit.to_dict(), "module": "openpose"}]}}})
    assert refused.status_code == 400 and "alwayson_scripts.controlnet.args[0].module" in refused.text
    pipe = DiffusionPipeline.from_pretrained(package, controlnet="pose")
    pipe.scheduler = scheduler_for(pipe.scheduler.config, "Euler a")  # webuiapi's default sampler
    expected = pipe(PROMPT, image=pose, height=64, width=64, num_inference_steps=2, guidance_scale=7.0,
                    controlnet_conditioning_scale=0.7, control_guidance_end=0.5, generator=[5],
                    prompt_weighting="a1111").images[0]
    got = np.asarray(controlled.image, np.int16)
    assert np.abs(got - np.asarray(expected, np.int16)).max() <= 1
    assert np.abs(got - np.asarray(plain.image, np.int16)).max() > 2  # the ControlNet steered the image
