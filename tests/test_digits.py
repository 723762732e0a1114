"""The built-in `digits` model (issue #9): a trained text-to-image package that ships inside the wheel.

Quality oracle: an RBF SVC fit at test time on the held-out split of scikit-learn's digits (never seen in training)
labels generated images after the same 32x32 -> 8x8 resampling; 10 digits x 8 seeds per setting.
Parity oracle: the diffusers StableDiffusionPipeline on the trained checkpoint folder (tests/data/digits_checkpoint),
same prompts and seeds, |diffrt - diffusers| <= 1e-3 on [0, 1] images.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the digits data set and the oracle classifier come from scikit-learn")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from digits import data, quality  # noqa: E402

from diffrt.runtime import DiffusionPipeline  # noqa: E402
from diffrt.runtime.builtin import builtin_names, resolve_builtin  # noqa: E402
from diffrt.schedulers import ays_schedule  # noqa: E402

CHECKPOINT = ROOT / "tests" / "data" / "digits_checkpoint"
PARITY_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def package() -> Path:
    return Path(resolve_builtin("digits"))


@pytest.fixture(scope="module")
def pipe(package: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(package, threads=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def oracle():
    return quality.fit_oracle()


def test_digits_is_a_builtin_package_inside_diffrt(package: Path):
    assert "digits" in builtin_names()
    assert package == ROOT / "diffrt" / "builtin_packages" / "digits"
    manifest = json.loads((package / "diffrt.json").read_text())
    assert manifest["precision"] == "fp32"
    size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"the shipped package should be a few MB, is {size / 2**20:.1f} MB"


def test_shipped_package_was_exported_from_the_shipped_checkpoint(package: Path):
    weights = json.loads((package / "diffrt.json").read_text())["source"]["weights_sha256"]
    assert set(weights) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                            "vae/diffusion_pytorch_model.safetensors"}
    for name, digest in weights.items():
        assert hashlib.sha256((CHECKPOINT / name).read_bytes()).hexdigest() == digest, name


def test_pixel_mapping_round_trips_the_training_digits():
    (ink, _), _ = data.load_split()
    rgb01 = (data.to_images(ink[:50]).transpose(0, 2, 3, 1) + 1) / 2
    assert rgb01.shape == (50, 32, 32, 3) and rgb01.min() >= 0 and rgb01.max() <= 1
    # bilinear up then area down is a mild blur, not the identity: mean error well under 1 ink level of 16
    assert np.abs(data.to_ink(rgb01) - ink[:50].reshape(50, 64)).mean() < 1.5


def test_oracle_recognises_real_digits(oracle):
    (ink, labels), _ = data.load_split()
    rgb01 = (data.to_images(ink).transpose(0, 2, 3, 1) + 1) / 2
    assert oracle.score(data.to_ink(rgb01), labels) >= 0.95


def test_generated_digits_are_recognised_at_20_steps(pipe, oracle):
    images = quality.generate(pipe, num_inference_steps=20)
    assert images.shape == (10, 8, 32, 32, 3)
    score = quality.accuracy(oracle, images)
    assert score >= 0.90, f"oracle accuracy {score:.3f} with the default scheduler at 20 steps"


def test_generated_digits_are_recognised_with_ays_at_10_steps(pipe, oracle):
    sigmas = [float(s) for s in ays_schedule("StableDiffusion", 10).sigmas]
    score = quality.accuracy(oracle, quality.generate(pipe, sigmas=sigmas))
    assert score >= 0.85, f"oracle accuracy {score:.3f} with AYS sigmas at 10 steps"


def test_images_match_diffusers_on_the_checkpoint(pipe):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend with the rest of the machine
    try:
        reference = diffusers.StableDiffusionPipeline.from_pretrained(CHECKPOINT)
        reference.set_progress_bar_config(disable=True)
        prompts, seeds = [data.prompt(label) for label in (0, 7, 9)], [0, 1]
        with torch.no_grad():
            theirs = reference(prompts, num_inference_steps=20, num_images_per_prompt=2, output_type="np",
                               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds * 3])
    finally:
        torch.set_num_threads(threads)
    ours = pipe(prompts, num_inference_steps=20, num_images_per_prompt=2, generator=seeds * 3, output_type="np")
    diff = np.abs(np.asarray(ours.images) - np.asarray(theirs.images)).max()
    assert np.asarray(ours.images).shape == (6, 32, 32, 3)
    assert diff <= PARITY_TOLERANCE, f"max |diffrt - diffusers| = {diff:.2e}"


def test_generate_command_writes_a_digit(tmp_path: Path, oracle):
    from PIL import Image

    from diffrt.cli import generate as generate_cli

    parser = argparse.ArgumentParser()
    generate_cli.add_arguments(parser)
    output = tmp_path / "seven.png"
    args = parser.parse_args(["digits", data.prompt(7), "--steps", "20", "--num-images", "4", "-o", str(output)])
    assert generate_cli.run(args) == 0
    paths = sorted(tmp_path.glob("seven-*.png"))
    assert len(paths) == 4
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in paths])
    assert images.shape == (4, 32, 32, 3)
    assert (oracle.predict(data.to_ink(images)) == 7).mean() >= 0.75
