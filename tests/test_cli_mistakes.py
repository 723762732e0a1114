"""No user mistake ends in a traceback: a table of mistakes, each run as a real `python -m diffrt.cli` process.

Each must exit non-zero with exactly one stderr line `diffrt COMMAND: error: ...` naming what to change, and leave
the folder as it was: no image written, no `.NAME.tmp` left behind, an existing file untouched.
"""
from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from cli_runner import REPO, one_line_error, run_cli
from PIL import Image

CHECKPOINT = REPO / "tests" / "data" / "digits_checkpoint"
GENERATE = ("generate", "digits", "a handwritten seven", "--steps", "2")


def png_header_only(path: Path, side: int) -> None:
    """A valid PNG that claims side x side pixels (1-bit grey) with almost no data: what a decompression bomb
    looks like to a reader, in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's folder: an image, things that are not images, a folder, a file where a folder is expected, an
    existing output, a package with a garbage manifest."""
    root = tmp_path_factory.mktemp("mistakes")
    Image.new("RGB", (32, 32), "white").save(root / "input.png")
    (root / "notes.png").write_text("not an image")
    (root / "truncated.png").write_bytes((root / "input.png").read_bytes()[:60])
    png_header_only(root / "bomb.png", 20_000)  # 400 M pixels: past Pillow's error limit (2 x 89 M)
    png_header_only(root / "large.png", 10_000)  # 100 M pixels: past its warning limit, which diffrt enforces
    (root / "folder").mkdir()
    (root / "plain-file").write_text("x")
    (root / "existing.png").write_bytes(b"keep me")
    garbage = root / "garbage-package"
    shutil.copytree(REPO / "diffrt" / "builtin_packages" / "digits", garbage)
    (garbage / "diffrt.json").write_bytes(bytes(range(256)) * 4)
    odd = root / "odd-manifest"
    shutil.copytree(REPO / "diffrt" / "builtin_packages" / "digits", odd)
    (odd / "diffrt.json").write_text('{"format_version": 1, "components": {"unet": {"file": "unet/model.onnx", '
                                     '"dims": {"batch": [1]}}}}')
    return root


# (id, argv, command, fragments the error line names)
MISTAKES = [
    ("image-missing", [*GENERATE, "--image", "missing.png"], "generate", ["`--image`", "missing.png", "no such"]),
    ("image-not-an-image", [*GENERATE, "--image", "notes.png"], "generate", ["notes.png", "not an image"]),
    ("image-truncated", [*GENERATE, "--image", "truncated.png"], "generate", ["truncated.png", "cannot be read"]),
    ("image-is-a-folder", [*GENERATE, "--image", "folder"], "generate", ["`--image`", "folder"]),
    ("image-bomb", [*GENERATE, "--image", "bomb.png"], "generate", ["bomb.png", "pixels", "decompression bomb"]),
    ("image-over-pixel-cap", [*GENERATE, "--image", "large.png"], "generate", ["large.png", "89478485 pixels"]),
    ("mask-missing", [*GENERATE, "--image", "input.png", "--mask", "gone.png"], "generate", ["`--mask`", "gone.png"]),
    ("mask-without-image", [*GENERATE, "--mask", "input.png"], "generate", ["`--mask` needs `--image`"]),
    ("prompt-not-utf8", ["generate", "digits", b"a \xff seven"], "generate", ["prompt", "UTF-8", r"b'\xff'"]),
    ("negative-not-utf8", [*GENERATE, "-n", b"\xfe\xfe"], "generate", ["--negative-prompt", "UTF-8"]),
    ("output-is-a-folder", [*GENERATE, "-o", "folder"], "generate", ["`--output`", "is a folder"]),
    ("output-under-a-file", [*GENERATE, "-o", "plain-file/x.png"], "generate", ["plain-file", "not a folder"]),
    ("output-exists", [*GENERATE, "-o", "existing.png"], "generate", ["existing.png", "--overwrite"]),
    ("output-unknown-format", [*GENERATE, "-o", "x.gif"], "generate", [".png, .jpg, .jpeg, .webp", "x.gif"]),
    ("strength-without-image", [*GENERATE, "--strength", "0.5"], "generate", ["`--strength` needs `--image`"]),
    ("strength-out-of-range", [*GENERATE, "--image", "input.png", "--strength", "1.5"], "generate",
     ["--strength", "(0, 1]", "1.5"]),
    ("size-with-image", [*GENERATE, "--image", "input.png", "--height", "64"], "generate", ["--height", "resize"]),
    ("unknown-scheduler", [*GENERATE, "--scheduler", "Eulerish"], "generate", ["sampler name", "Eulerish"]),
    ("unavailable-sampler", [*GENERATE, "--scheduler", "DPM fast"], "generate", ["not available", "DPM fast"]),
    ("steps-not-a-number", [*GENERATE, "--steps", "many"], "generate", ["--steps", "integer >= 1", "many"]),
    ("steps-zero", [*GENERATE, "--steps", "0"], "generate", ["--steps", "integer >= 1"]),
    ("guidance-nan", [*GENERATE, "--guidance", "nan"], "generate", ["--guidance", "nan"]),
    ("guidance-negative", [*GENERATE, "--guidance", "-1"], "generate", ["--guidance", ">= 0"]),
    ("seed-negative", [*GENERATE, "--seed", "-5"], "generate", ["--seed", "-1 for a random seed"]),
    ("seed-too-large", [*GENERATE, "--seed", str(2**64)], "generate", ["--seed", "2**63 - 1"]),
    ("num-images-zero", [*GENERATE, "--num-images", "0"], "generate", ["--num-images"]),
    ("threads-zero", [*GENERATE, "--threads", "0"], "generate", ["--threads"]),
    ("height-not-a-multiple", [*GENERATE, "--height", "30"], "generate", ["`height`", "multiple of 4"]),
    # sizes, images per call and steps beyond what the package and its scheduler take: refused before any work
    ("height-beyond-package", [*GENERATE, "--height", "100000"], "generate", ["`height`", "[4, 2048]", "100000"]),
    ("num-images-beyond-package", [*GENERATE, "--num-images", "17"], "generate", ["[1, 16]", "17 images"]),
    ("steps-beyond-grid", [*GENERATE[:3], "--steps", "1000000"], "generate", ["[1, 1000]", "1000000"]),
    ("sigmas-not-numbers", [*GENERATE, "--sigmas", "1,x"], "generate", ["--sigmas", "numbers"]),
    ("schedules-together", [*GENERATE, "--ays", "--sigmas", "1,0"], "generate", ["--sigmas", "--ays"]),
    ("cuda-graph-on-cpu", [*GENERATE, "--cuda-graph"], "generate", ["--cuda-graph", "cuda"]),
    ("no-prompt", ["generate", "digits"], "generate", ["`PACKAGE` and `PROMPT`", "--from-png"]),
    ("checkpoint-not-package", ["generate", str(CHECKPOINT), "a seven"], "generate",
     ["diffusers checkpoint", "diffrt export"]),
    ("package-missing", ["generate", "./no-such-package", "a seven"], "generate", ["no-such-package"]),
    ("package-garbage-manifest", ["generate", "garbage-package", "a seven"], "generate", ["diffrt.json", "JSON"]),
    ("from-png-missing", ["generate", "--from-png", "gone.png"], "generate", ["`--from-png`", "gone.png"]),
    ("from-png-not-an-image", ["generate", "--from-png", "notes.png"], "generate", ["notes.png", "not an image"]),
    ("from-png-no-parameters", ["generate", "--from-png", "input.png"], "generate", ["no generation parameters"]),
    ("unknown-option", [*GENERATE, "--colour", "red"], "generate", ["unrecognized arguments", "--colour"]),
    ("info-garbage-manifest", ["info", "garbage-package"], "info", ["diffrt.json", "not valid JSON"]),
    ("info-odd-manifest", ["info", "odd-manifest"], "info", ["dims", "[1]"]),
    ("info-not-a-package", ["info", "folder"], "info", ["diffrt.json", "folder"]),
    ("info-unknown-name", ["info", "nonesuch"], "info", ["built-in name", "nonesuch"]),
    ("info-invalid-repo-id", ["info", "bad name/x"], "info", ["bad name/x", "Hub repo id"]),
    ("info-uncached-repo-offline", ["info", "someone/nothing-here"], "info", ["someone/nothing-here", "offline"]),
]


@pytest.mark.parametrize(("argv", "command", "fragments"), [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_error_line_and_changes_nothing(workdir: Path, argv, command: str, fragments: list[str]):
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    result = run_cli(*argv, cwd=workdir, HF_HUB_OFFLINE="1", HF_HOME=str(workdir / "hf-home"), HF_HUB_CACHE=None)
    assert result.returncode in (1, 2), result.stderr
    one_line_error(result.stderr, command, *fragments)
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    assert after == before, sorted(set(after) ^ set(before))


def test_output_in_a_folder_without_write_permission_is_refused_before_generating(workdir: Path, tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: there is no unwritable folder to test with")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_cli(*GENERATE, "-o", locked / "x.png")
    one_line_error(result.stderr, "generate", "no permission", "locked")
    assert list(locked.iterdir()) == []
