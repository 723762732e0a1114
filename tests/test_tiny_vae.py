"""The tiny autoencoder (TAESD) as optional package components, and `vae="tiny"` in the runtime.

Oracle: diffusers' `AutoencoderTiny` with random weights (narrow layers, but latent_channels 4 and the real 8x
factor), saved as a folder laid out like madebyollin/taesd. Tolerances: the exported ONNX graphs vs the diffusers
module, max abs diff <= 1e-4 (outputs are O(1); ONNX Runtime and PyTorch float32 kernels differ by ~1e-6); our
pipelines vs Diffusers pipelines built with `vae=AutoencoderTiny(...)`, same seed, max abs diff <= 1e-3 on images
in [0, 1] (as in tests/test_runtime_pipelines.py).
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

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from diffrt import schedulers as ours  # noqa: E402
from diffrt.cli import main  # noqa: E402
from diffrt.errors import ConfigError, InputError, PackageError  # noqa: E402
from diffrt.export import add_tiny_vae, export_pipeline  # noqa: E402
from diffrt.export.taesd import check_fits, resolve_tiny_vae  # noqa: E402
from diffrt.package.reader import ModelPackage  # noqa: E402
from diffrt.runtime import DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline  # noqa: E402
from diffrt.runtime.pipelines.auto import AutoPipelineForImage2Image  # noqa: E402

ONNX_TOL = 1e-4
PIPELINE_TOL = 1e-3
PROMPT = "a photo of a cat sitting on a red chair"
ONNX_ENTRY = ["diffusers", "OnnxRuntimeModel"]
TINY = ("vae_decoder_tiny", "vae_encoder_tiny")
# Narrow TAESD: four stages (8x), one block each, 8 channels; everything else is diffusers' (= taesd's) default.
TAESD = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
             num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
REPO_ROOT = Path(__file__).resolve().parents[1]


def save_taesd(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    diffusers.AutoencoderTiny(**{**TAESD, **overrides}).eval().save_pretrained(folder)
    return folder


def assert_close(expected, got, tol):
    expected, got = np.asarray(expected), np.asarray(got)
    assert expected.shape == got.shape
    diff = float(np.abs(expected.astype(np.float64) - got).max())
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol:.0e}"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def taesd(tmp_path_factory) -> Path:
    return save_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.fixture(scope="module")
def wide_latent_taesd(tmp_path_factory) -> Path:
    return save_taesd(tmp_path_factory.mktemp("taesd16") / "taesd16", latent_channels=16)


@pytest.fixture(scope="module")
def sd_package(tiny_package, taesd, tmp_path_factory) -> Path:
    """A copy of the tiny SD 1.x package with the tiny VAE added by `diffrt export --tiny-vae TAESD --into PKG`."""
    package = tmp_path_factory.mktemp("with_tiny_vae") / "sd15"
    shutil.copytree(tiny_package("sd15"), package)
    assert main(["export", "--tiny-vae", str(taesd), "--into", str(package)]) == 0
    return package


@pytest.fixture(scope="module")
def tiny_reference(taesd):
    return diffusers.AutoencoderTiny.from_pretrained(taesd).eval()


def reference_pipe(cls, tiny_checkpoint, tiny_reference):
    pipe = cls.from_pretrained(tiny_checkpoint("sd15"), vae=tiny_reference, safety_checker=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----- the package -----
def test_into_adds_tiny_components_to_manifest_and_index(sd_package, tiny_package, taesd):
    original = read_json(tiny_package("sd15") / "diffrt.json")
    manifest, index = read_json(sd_package / "diffrt.json"), read_json(sd_package / "model_index.json")
    assert {name: manifest["components"][name] for name in original["components"]} == original["components"]
    decoder, encoder = (manifest["components"][name] for name in TINY)
    assert decoder["file"] == "vae_decoder_tiny/model.onnx" and encoder["file"] == "vae_encoder_tiny/model.onnx"
    assert [io["name"] for io in decoder["inputs"]] == ["latent_sample"]
    assert decoder["outputs"] == [{"name": "sample", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}]
    assert encoder["outputs"] == [{"name": "latents", "dtype": "float32",
                                   "shape": ["batch", 4, "latent_height", "latent_width"]}]
    for entry in (decoder, encoder):
        assert entry["precision"] == original["precision"] == "fp32"
        assert 0 <= entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]
        assert entry["source"]["id"] == str(taesd) and entry["source"]["kind"] == "folder"
        assert set(entry["source"]["weights_sha256"]) == {"diffusion_pytorch_model.safetensors"}
    assert index["vae_decoder_tiny"] == index["vae_encoder_tiny"] == ONNX_ENTRY
    assert {k: v for k, v in index.items() if k not in TINY} == read_json(tiny_package("sd15") / "model_index.json")
    config = read_json(sd_package / "vae_decoder_tiny" / "config.json")
    assert config["_class_name"] == "AutoencoderTiny" and config["scaling_factor"] == 1.0
    assert config["latent_channels"] == 4 and config["block_out_channels"] == [8, 8, 8, 8]
    assert not [p.name for p in sd_package.iterdir() if p.name.startswith(".")]  # no temp folders left
    assert {"vae_decoder_tiny", "vae_encoder_tiny"} <= set(ModelPackage.open(sd_package).components)


def test_exported_tiny_graphs_match_diffusers(sd_package, tiny_reference):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 12, generator=gen) * 2
    image = torch.rand(2, 3, 64, 96, generator=gen) * 2 - 1
    with torch.no_grad():
        decoded, encoded = tiny_reference.decode(latents).sample, tiny_reference.encode(image).latents
    decoder = ort.InferenceSession(str(sd_package / "vae_decoder_tiny" / "model.onnx"))
    encoder = ort.InferenceSession(str(sd_package / "vae_encoder_tiny" / "model.onnx"))
    assert_close(decoded.numpy(), decoder.run(["sample"], {"latent_sample": latents.numpy()})[0], ONNX_TOL)
    assert_close(encoded.numpy(), encoder.run(["latents"], {"sample": image.numpy()})[0], ONNX_TOL)
    assert float(decoded.std()) > 0.05 and float(encoded.std()) > 0.05  # random weights, but not a constant


def test_export_pipeline_writes_the_tiny_decoder_beside_the_vae(tiny_checkpoint, taesd, tmp_path):
    output = export_pipeline(tiny_checkpoint("sd15"), tmp_path / "pkg", components=["vae_decoder"], tiny_vae=taesd)
    manifest, index = read_json(output / "diffrt.json"), read_json(output / "model_index.json")
    # No vae_encoder exported, so no vae_encoder_tiny either.
    assert list(manifest["components"]) == ["vae_decoder", "vae_decoder_tiny"]
    assert index["vae_decoder"] == index["vae_decoder_tiny"] == ONNX_ENTRY and "vae_encoder_tiny" not in index
    assert (output / "vae_decoder_tiny" / "model.onnx").is_file()
    assert read_json(output / "vae_decoder_tiny" / "config.json")["_class_name"] == "AutoencoderTiny"


def test_diffusers_onnx_pipeline_loads_the_package_and_ignores_the_tiny_components(sd_package):
    if not hasattr(diffusers, "OnnxStableDiffusionPipeline"):
        pytest.skip("this diffusers has no ONNX pipelines")
    pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(
        sd_package, provider="CPUExecutionProvider", safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    assert {"unet", "vae_decoder", "vae_encoder"} <= set(pipe.components)
    assert not set(TINY) & set(pipe.components)


# ----- the runtime -----
def test_text_to_image_with_tiny_vae_matches_diffusers(sd_package, tiny_checkpoint, tiny_reference):
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=96, num_images_per_prompt=2)
    ref = reference_pipe(diffusers.StableDiffusionPipeline, tiny_checkpoint, tiny_reference)
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).images
    pipe = DiffusionPipeline.from_pretrained(sd_package, vae="tiny")
    pipe.set_progress_bar_config(disable=True)
    got = pipe(generator=0, output_type="np", **kwargs).images
    assert_close(expected, got, PIPELINE_TOL)
    full = DiffusionPipeline.from_pretrained(sd_package)
    full.set_progress_bar_config(disable=True)
    assert np.abs(full(generator=0, output_type="np", **kwargs).images - got).max() > 0.05  # really the tiny VAE


@pytest.mark.slow  # exports the tiny SDXL package (shared with other modules) when run alone
def test_sdxl_text_to_image_with_tiny_vae_matches_diffusers(tiny_package, tiny_checkpoint, tiny_reference, taesd,
                                                            tmp_path):
    package = tmp_path / "sdxl"
    shutil.copytree(tiny_package("sdxl"), package)
    add_tiny_vae(package, taesd)
    kwargs = dict(prompt=PROMPT, num_inference_steps=3, height=64, width=64)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_checkpoint("sdxl"), vae=tiny_reference)
    ref.set_progress_bar_config(disable=True)
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).images
    pipe = DiffusionPipeline.from_pretrained(package, vae="tiny")
    pipe.set_progress_bar_config(disable=True)
    assert_close(expected, pipe(generator=0, output_type="np", **kwargs).images, PIPELINE_TOL)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_with_tiny_encoder_matches_diffusers(strength, sd_package, tiny_checkpoint, tiny_reference):
    """Euler ancestral draws noise every step: the tiny encoder must not draw from the generator (none does)."""
    image = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
    kwargs = dict(prompt=PROMPT, image=image, strength=strength, num_inference_steps=4)
    ref = reference_pipe(diffusers.StableDiffusionImg2ImgPipeline, tiny_checkpoint, tiny_reference)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).images
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd_package, vae="tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ours.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    assert_close(expected, pipe(generator=0, output_type="np", **kwargs).images, PIPELINE_TOL)


def test_vae_choice_is_kept_by_from_pipe_and_is_no_engine_option(sd_package):
    pipe = DiffusionPipeline.from_pretrained(sd_package, vae="tiny")
    assert pipe.vae.kind == "tiny" and "vae" not in pipe.engine_options
    assert pipe.vae_config["scaling_factor"] == 1.0 and pipe.vae_scale_factor == 8
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    assert img2img.vae.kind == "tiny" and img2img.vae_components["vae_encoder"] == "vae_encoder_tiny"
    assert DiffusionPipeline.from_pretrained(sd_package).vae_config["scaling_factor"] == pytest.approx(0.18215)


def test_generate_cli_with_tiny_vae(sd_package, tmp_path, capsys):
    from PIL import Image

    args = ["generate", str(sd_package), PROMPT, "--steps", "2", "--height", "64", "--width", "64", "--seed", "3"]
    assert main([*args, "--vae", "tiny", "-o", str(tmp_path / "tiny.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "full.png")]) == 0
    with Image.open(tmp_path / "tiny.png") as png:
        tiny, metadata = np.asarray(png), json.loads(png.text["diffrt"])
    pipe = DiffusionPipeline.from_pretrained(sd_package, vae="tiny")
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=3).images[0]
    np.testing.assert_array_equal(tiny, np.asarray(direct))
    with Image.open(tmp_path / "full.png") as png:
        assert np.abs(np.asarray(png).astype(int) - tiny).max() > 10
    assert metadata["vae"] == "tiny"


# ----- errors -----
def test_tiny_vae_on_a_package_without_it_says_how_to_add_it(tiny_package):
    with pytest.raises(PackageError, match=r"no vae_decoder_tiny component.*--tiny-vae"):
        DiffusionPipeline.from_pretrained(tiny_package("sd15"), vae="tiny")


@pytest.mark.parametrize("value", ["small", None, "TINY"])
def test_unknown_vae_value_is_an_input_error(sd_package, value):
    with pytest.raises(InputError, match=rf"`vae` must be 'full' or 'tiny'; got {value!r}"):
        DiffusionPipeline.from_pretrained(sd_package, vae=value)
    with pytest.raises(InputError, match="`vae` must be 'full' or 'tiny'"):
        StableDiffusionPipeline(ModelPackage.open(sd_package), vae=value)


def test_latent_channel_mismatch_names_tiny_vae_before_anything_is_written(
        sd_package, wide_latent_taesd, tiny_checkpoint, tmp_path):
    message = r"`tiny_vae` must have latent_channels 4 .* has 16"
    with pytest.raises(ConfigError, match=message):
        export_pipeline(tiny_checkpoint("sd15"), tmp_path / "pkg", tiny_vae=wide_latent_taesd)
    assert not (tmp_path / "pkg").exists()
    before = (sd_package / "diffrt.json").read_bytes()
    with pytest.raises(ConfigError, match=message):
        add_tiny_vae(sd_package, wide_latent_taesd, overwrite=True)
    assert (sd_package / "diffrt.json").read_bytes() == before


def test_inpaint_unet_input_channels_are_not_the_latent_channels(tiny_checkpoint, taesd, wide_latent_taesd):
    folder = tiny_checkpoint("sd_inpaint")
    unet, vae = read_json(folder / "unet" / "config.json"), read_json(folder / "vae" / "config.json")
    assert unet["in_channels"] == 9
    check_fits(resolve_tiny_vae(taesd), unet, vae)  # 4 latent channels: accepted
    with pytest.raises(ConfigError, match="`tiny_vae` must have latent_channels 4"):
        check_fits(resolve_tiny_vae(wide_latent_taesd), unet, vae)


def test_adding_twice_needs_overwrite(sd_package, taesd):
    with pytest.raises(InputError, match=r"`package` must be a package without vae_decoder_tiny .*overwrite"):
        add_tiny_vae(sd_package, taesd)


def test_tiny_vae_source_must_be_an_autoencoder_tiny(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError, match="`tiny_vae` must be an AutoencoderTiny folder .* or a Hub repo id"):
        resolve_tiny_vae(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"`tiny_vae` must be an AutoencoderTiny \(TAESD\) model; .*AutoencoderKL"):
        resolve_tiny_vae(tiny_checkpoint("sd15") / "vae")


@pytest.mark.parametrize("argv, fragment", [
    (["export", "--into", "PKG"], "`--into PACKAGE` needs `--tiny-vae TAESD` or `--controlnet CN`"),
    (["export", "SRC", "--tiny-vae", "T", "--into", "PKG"], "it takes no `source`"),
    (["export", "--tiny-vae", "T"], "`source` and `output` are required"),
])
def test_cli_into_argument_errors_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


OFFLINE_SCRIPT = """
import json, sys
from diffrt.export.taesd import resolve_tiny_vae
out = {}
for repo in sys.argv[1:]:
    try:
        tiny = resolve_tiny_vae(repo)
        out[repo] = {"kind": tiny.kind, "path": str(tiny.path), "revision": tiny.revision}
    except Exception as error:
        out[repo] = {"error": type(error).__name__, "message": str(error)}
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import
def test_hub_repo_ids_resolve_from_the_cache_when_offline(taesd, tmp_path):
    """The files laid out as huggingface_hub caches a repo: models--owner--name/snapshots/<commit>, refs/main."""
    hub, commit = tmp_path / "hf_home" / "hub", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(taesd, hub / "models--madebyollin--taesd" / "snapshots" / commit)
    (hub / "models--madebyollin--taesd" / "refs").mkdir()
    (hub / "models--madebyollin--taesd" / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, "madebyollin/taesd", "nobody/taesd"], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    results = json.loads(run.stdout.strip().splitlines()[-1])
    snapshot = hub / "models--madebyollin--taesd" / "snapshots" / commit
    assert results["madebyollin/taesd"] == {"kind": "hub", "path": str(snapshot), "revision": commit}
    missing = results["nobody/taesd"]
    assert missing["error"] == "InputError" and "HF_HUB_OFFLINE" in missing["message"]
