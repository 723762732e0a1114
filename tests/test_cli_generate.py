"""`diffrt generate` with the built-in digits model, as real processes: output files, seeds, and the parameters each
file carries (A1111's infotext and diffrt's JSON), read back by `--from-png` and by piexif (A1111's EXIF reader)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image, PngImagePlugin

from diffrt.runtime.infotext import parse_infotext

PROMPT = "a handwritten seven"
FAST = ("--steps", "6")  # a real generation in well under a second; the files are what is tested here


def generate(tmp_path: Path, *args: str | Path) -> list[str]:
    """Run `diffrt generate` in tmp_path; its stdout lines."""
    result = run_cli("generate", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def fields_of(path: Path) -> dict[str, str]:
    with Image.open(path) as image:
        return parse_infotext(image.text["parameters"]).fields


@pytest.mark.parametrize(("name", "image_format"), [("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.jpeg", "JPEG"),
                                                   ("d.webp", "WEBP"), ("e.PNG", "PNG")])
def test_the_extension_names_the_format(tmp_path: Path, name: str, image_format: str):
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "1", "-o", name)
    with Image.open(tmp_path / name) as image:
        assert image.format == image_format and image.size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # written in place: no temp file beside it


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path: Path):
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "1", "-o", "out.png")
    first = (tmp_path / "out.png").read_bytes()
    refused = run_cli("generate", "digits", "a handwritten two", *FAST, "-o", "out.png", cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert (tmp_path / "out.png").read_bytes() == first
    generate(tmp_path, "digits", "a handwritten two", *FAST, "--seed", "1", "-o", "out.png", "--overwrite")
    assert (tmp_path / "out.png").read_bytes() != first


def test_png_carries_a1111_infotext_and_diffrt_json(tmp_path: Path):
    generate(tmp_path, "digits", PROMPT, "-n", "blurry, thin", "--steps", "7", "--guidance", "6",
             "--scheduler", "DPM++ 2M Karras", "--seed", "123", "-o", "x.png")
    with Image.open(tmp_path / "x.png") as image:
        text, record = image.text["parameters"], json.loads(image.text["diffrt"])
    lines = text.split("\n")
    assert lines[:2] == [PROMPT, "Negative prompt: blurry, thin"]
    assert re.fullmatch(r"Steps: 7, Sampler: DPM\+\+ 2M, Schedule type: Karras, CFG scale: 6, Seed: 123, "
                        r"Size: 32x32, Model hash: [0-9a-f]{10}, Model: digits", lines[2]), lines[2]
    assert record["seed"] == 123 and record["scheduler"] == "DPMSolverMultistepScheduler"
    assert record["scheduler_config"]["use_karras_sigmas"] is True and record["package"] == "digits"


def test_without_negative_prompt_there_is_no_negative_line_and_img2img_adds_its_strength(tmp_path: Path):
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "2", "-o", "t2i.png")
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "2", "--image", "t2i.png", "--strength", "0.6",
             "-o", "i2i.png")
    with Image.open(tmp_path / "t2i.png") as t2i, Image.open(tmp_path / "i2i.png") as i2i:
        assert "Negative prompt" not in t2i.text["parameters"]
        assert "Denoising strength" not in t2i.text["parameters"]
        assert i2i.text["parameters"].endswith(", Model: digits, Denoising strength: 0.6")


def test_a_random_seed_is_drawn_recorded_and_reproduces_the_image(tmp_path: Path):
    out = generate(tmp_path, "digits", PROMPT, *FAST, "-o", "random.png")
    seed = int(fields_of(tmp_path / "random.png")["Seed"])
    assert out[0] == f"wrote random.png (seed {seed})" and 0 <= seed < 2**32
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "-1", "-o", "other.png")
    assert int(fields_of(tmp_path / "other.png")["Seed"]) != seed  # two draws from 2**32 seeds
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", str(seed), "-o", "again.png")
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "random.png"))


def test_several_images_get_consecutive_seeds_and_named_files(tmp_path: Path):
    out = generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "10", "--num-images", "3", "-o", "batch.png")
    assert out[:3] == [f"wrote batch-{s}.png (seed {s})" for s in (10, 11, 12)]
    assert [fields_of(tmp_path / f"batch-{s}.png")["Seed"] for s in (10, 11, 12)] == ["10", "11", "12"]
    images = [pixels(tmp_path / f"batch-{s}.png") for s in (10, 11, 12)]
    assert not np.array_equal(images[0], images[1])
    # Any one of them again, alone, from its seed (A1111's rule: each image has its own generator). A batch runs the
    # UNet on 6 rows instead of 2, which may round differently: one uint8 level is allowed.
    generate(tmp_path, "digits", PROMPT, *FAST, "--seed", "11", "-o", "alone.png")
    assert np.abs(pixels(tmp_path / "alone.png").astype(int) - images[1]).max() <= 1


def test_from_png_makes_the_same_pixels_again(tmp_path: Path):
    generate(tmp_path, "digits", PROMPT, "-n", "blurry", "--steps", "9", "--guidance", "5.5",
             "--scheduler", "Euler a", "--seed", "77", "-o", "original.png")
    out = generate(tmp_path, "--from-png", "original.png", "-o", "again.png")
    assert out[0] == "wrote again.png (seed 77)"
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "original.png"))
    assert fields_of(tmp_path / "again.png") == fields_of(tmp_path / "original.png")


def test_from_png_needs_only_the_a1111_infotext(tmp_path: Path):
    """An image holding nothing but A1111's `parameters` text (as A1111 writes it) is enough to make it again."""
    generate(tmp_path, "digits", PROMPT, "--steps", "8", "--scheduler", "DPM++ 2M Karras", "--seed", "5",
             "-o", "ours.png")
    with Image.open(tmp_path / "ours.png") as image:
        text = image.text["parameters"]
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        image.save(tmp_path / "a1111.png", pnginfo=info)
    with Image.open(tmp_path / "a1111.png") as image:
        assert set(image.text) == {"parameters"}
    generate(tmp_path, "--from-png", "a1111.png", "-o", "again.png")
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "ours.png"))


def test_from_png_reads_old_sampler_names_and_options_override_it(tmp_path: Path):
    """A1111 before 1.9 wrote "Sampler: DPM++ 2M Karras" and no Schedule type; options given win."""
    infotext = ("a handwritten three\nNegative prompt: thin\nSteps: 8, Sampler: DPM++ 2M Karras, CFG scale: 7, "
                "Seed: 9, Size: 32x32, Model hash: 0123456789, Model: digits")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    Image.new("RGB", (32, 32)).save(tmp_path / "old.png", pnginfo=info)
    generate(tmp_path, "--from-png", "old.png", "--seed", "10", "-o", "new.png")
    fields = fields_of(tmp_path / "new.png")
    assert (fields["Sampler"], fields["Schedule type"], fields["Seed"], fields["Steps"]) == (
        "DPM++ 2M", "Karras", "10", "8")
    generate(tmp_path, "digits", "a handwritten three", "-n", "thin", "--steps", "8", "--guidance", "7",
             "--scheduler", "DPM++ 2M Karras", "--seed", "10", "-o", "direct.png")
    assert np.array_equal(pixels(tmp_path / "new.png"), pixels(tmp_path / "direct.png"))


def test_from_png_warns_when_the_model_hash_differs(tmp_path: Path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a seven\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, "
                  "Model hash: 0123456789, Model: digits")
    Image.new("RGB", (32, 32)).save(tmp_path / "other.png", pnginfo=info)
    result = run_cli("generate", "--from-png", "other.png", "-o", "x.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "model hash 0123456789" in result.stderr and "will differ" in result.stderr


@pytest.mark.parametrize("name", ["x.jpg", "x.webp"])
def test_jpeg_and_webp_carry_the_infotext_in_exif_as_a1111_reads_it(tmp_path: Path, name: str):
    piexif = pytest.importorskip("piexif")
    helper = pytest.importorskip("piexif.helper")

    generate(tmp_path, "digits", "a handwritten seven, ünïcode: yes", *FAST, "--seed", "3", "-o", name)
    with Image.open(tmp_path / name) as image:
        exif = piexif.load(image.info["exif"])  # what A1111's read_info_from_image does
    text = helper.UserComment.load(exif["Exif"][piexif.ExifIFD.UserComment])
    assert text.startswith("a handwritten seven, ünïcode: yes\nSteps: 6, Sampler: Euler, ")
    generate(tmp_path, "--from-png", name, "-o", "again.png")
    assert fields_of(tmp_path / "again.png") == parse_infotext(text).fields


def test_prompts_are_read_with_a1111_emphasis_unless_told_otherwise(tmp_path: Path):
    from diffrt.runtime import DiffusionPipeline

    prompt = "a (handwritten:1.5) [seven] BREAK two"
    generate(tmp_path, "digits", prompt, *FAST, "--seed", "5", "-o", "weighted.png")
    generate(tmp_path, "digits", prompt, *FAST, "--seed", "5", "--prompt-weighting", "none", "-o", "plain.png")
    pipe = DiffusionPipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    for name, weighting in (("weighted.png", "a1111"), ("plain.png", None)):
        want = pipe(prompt, generator=[5], num_inference_steps=6, prompt_weighting=weighting).images[0]
        np.testing.assert_array_equal(pixels(tmp_path / name), np.asarray(want))
    assert np.abs(pixels(tmp_path / "weighted.png").astype(int) - pixels(tmp_path / "plain.png")).max() > 0
