"""Packages written by the real `optimum-cli export onnx` run in diffrt and give Optimum's image.

The Optimum side runs in its own venv (tests/optimum_env.py: optimum-onnx pins transformers < 4.58); it exports the
tiny SD 1.x and SDXL checkpoints, and its `ORTDiffusionPipeline` makes the reference image for a seed. diffrt opens
the same folder (no diffrt.json; a rank-0 UNet `timestep`; model_index.json with the torch class entries) and must
give the same image within 1e-3, by the library and by `diffrt generate`; `diffrt info` describes the folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from hub_cache import add_snapshot
from optimum_env import run_in_venv
from PIL import Image

from diffrt import DiffusionPipeline
from diffrt.bench.tokenizer_files import write_clip_tokenizer_files
from diffrt.package.files import read_json
from diffrt.package.reader import ModelPackage

pytestmark = pytest.mark.slow

SIDE = Path(__file__).parent / "optimum_side" / "generate.py"
PROMPT, SEED, STEPS, SIZE, GUIDANCE = "a photo of a cat", 3, 3, 64, 7.5
TOLERANCE = 1e-3


def transformers4_checkpoint(source: Path, folder: Path) -> Path:
    """The tiny checkpoint as transformers 4.x reads it: its slow CLIPTokenizer needs vocab.json + merges.txt,
    which transformers 5 (the main environment, which built the checkpoint) no longer writes beside
    tokenizer.json. The BPE files are the ones the checkpoint's tokenizer was built from (same builder)."""
    shutil.copytree(source, folder)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (folder / tokenizer).is_dir():
            write_clip_tokenizer_files(folder / tokenizer)
    return folder


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def optimum_export(request, optimum_python, tiny_checkpoint, tmp_path_factory) -> tuple[str, Path, np.ndarray]:
    """(kind, the folder `optimum-cli export onnx` wrote, Optimum's image for SEED)."""
    kind = request.param
    work = tmp_path_factory.mktemp(f"optimum_{kind}")
    checkpoint = transformers4_checkpoint(tiny_checkpoint(kind), work / "checkpoint")
    package = work / "package"
    cli = optimum_python.parent / "optimum-cli"
    run_in_venv(optimum_python, cli, "export", "onnx", "--model", checkpoint, "--task", "text-to-image", package)
    reference = work / "optimum.npy"
    run_in_venv(optimum_python, SIDE, package, reference, SEED, STEPS, SIZE, GUIDANCE, PROMPT)
    return kind, package, np.load(reference)


def test_the_optimum_export_is_the_real_format(optimum_export) -> None:
    """What diffrt has to read: no manifest, a scalar timestep, the torch class names in model_index.json."""
    kind, package, _ = optimum_export
    assert not (package / "diffrt.json").exists()
    index = read_json(package / "model_index.json")
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    timestep = next(t for t in ModelPackage.open(package).graph_io("unet")[0] if t.name == "timestep")
    assert timestep.shape == ()


def test_diffrt_image_equals_optimums(optimum_export) -> None:
    kind, package, reference = optimum_export
    pipe = DiffusionPipeline.from_pretrained(package)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                  generator=SEED, output_type="np").images
    assert images.shape == reference.shape == (1, SIZE, SIZE, 3)
    assert reference.std() > 0.05  # a real image, not a constant
    np.testing.assert_allclose(images, reference, atol=TOLERANCE, rtol=0)


def test_diffrt_generate_runs_an_optimum_package(optimum_export, tmp_path: Path) -> None:
    kind, package, reference = optimum_export
    out = tmp_path / "image.png"
    result = run_cli("generate", package, PROMPT, "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed",
                     str(SEED), "--height", str(SIZE), "--width", str(SIZE), "-o", out)
    assert result.returncode == 0, result.stderr
    pixels = np.asarray(Image.open(out), dtype=np.int16)
    expected = np.round(reference[0] * 255).astype(np.int16)
    assert np.abs(pixels - expected).max() <= 1  # the same image, up to 8-bit rounding


def test_diffrt_info_describes_an_optimum_package(optimum_export) -> None:
    kind, package, _ = optimum_export
    result = run_cli("info", package)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pipeline = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    assert lines[0] == f"pipeline   {pipeline}"
    assert "      in  timestep: float32 []" in lines
    assert "      out out_sample: float32 [batch_size, 4, height, width]" in lines
    assert "      out sample: float32 [batch_size, 3, latent_height * 8, latent_width * 8]" in lines
    assert any(line.startswith("  unet: unet/model.onnx, ") and line.endswith(" MiB") for line in lines)


def test_an_optimum_package_from_the_hub_cache_runs_and_is_described(optimum_export, tmp_path: Path) -> None:
    """Both at once: Optimum's folder uploaded to the Hub and found in the cache (symlinks into blobs/), offline."""
    kind, package, reference = optimum_export
    add_snapshot(tmp_path / "home" / "hub", f"someone/{kind}-onnx", package)
    result = run_cli("info", f"someone/{kind}-onnx", HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
                     HF_HUB_CACHE=None)
    assert result.returncode == 0, result.stderr
    assert "      in  timestep: float32 []" in result.stdout.splitlines()
    pipe = DiffusionPipeline.from_pretrained(f"someone/{kind}-onnx", cache_dir=tmp_path / "home" / "hub",
                                             local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                  generator=SEED, output_type="np").images
    np.testing.assert_allclose(images, reference, atol=TOLERANCE, rtol=0)
