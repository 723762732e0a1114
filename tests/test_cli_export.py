"""`diffrt export` and `diffrt info`: exit codes, one-line errors, nothing left behind, the printed manifest."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import REPO, one_line_error, run_cli

from diffrt.cli import SUBCOMMANDS, main


def test_bad_precision_is_a_one_line_error_with_exit_code_2(tiny_checkpoint, tmp_path):
    result = run_cli("export", tiny_checkpoint("sd15"), tmp_path / "out", "--precision", "fp8")
    assert result.returncode == 2
    one_line_error(result.stderr, "export", "--precision", "fp8", "fp16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--components", "unet,refiner"], ("`components`", "'refiner'", "text_encoder_2")),
    (["--components", "text_encoder_2"], ("`components`", "'text_encoder_2'", "text_encoder, unet")),
    (["--opset", "12"], ("`opset`", "[18, 23]", "12")),
    (["--precision", "bf16", "--target", "tensorrt"], ("`opset`", ">= 22", "bf16")),
])
def test_argument_errors_exit_2_before_anything_is_written(tiny_checkpoint, tmp_path, capsys, extra, fragments):
    code = main(["export", str(tiny_checkpoint("sd15")), str(tmp_path / "out"), *extra])
    assert code == 2
    one_line_error(capsys.readouterr().err, "export", *fragments)
    assert list(tmp_path.iterdir()) == []


def test_missing_source_exits_2_and_creates_nothing(tmp_path, capsys):
    code = main(["export", str(tmp_path / "no_such_checkpoint"), str(tmp_path / "out")])
    assert code == 2
    one_line_error(capsys.readouterr().err, "export", "`source`", "no_such_checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code = main(["export", str(tiny_checkpoint("sd15")), str(output)])
    assert code == 2
    one_line_error(capsys.readouterr().err, "export", "`output`", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (output / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def replaced_package(tiny_checkpoint, tiny_package, tmp_path_factory) -> Path:
    """`diffrt export SOURCE OUT --components text_encoder --overwrite` over a complete earlier package."""
    output = tmp_path_factory.mktemp("cli") / "out"
    shutil.copytree(tiny_package("sd15"), output)
    assert main(["export", str(tiny_checkpoint("sd15")), str(output), "--components", "text_encoder",
                 "--overwrite"]) == 0
    return output


def test_export_with_overwrite_replaces_the_folder_atomically(replaced_package):
    output = replaced_package
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]  # no temp or old folder left beside it
    assert not (output / "unet").exists() and not (output / "vae_decoder").exists()  # the old package is gone
    manifest = json.loads((output / "diffrt.json").read_text())
    assert list(manifest["components"]) == ["text_encoder"]
    index = json.loads((output / "model_index.json").read_text())
    assert {k for k, v in index.items() if isinstance(v, list)} == {"text_encoder", "tokenizer", "scheduler"}


def test_info_prints_the_manifest(replaced_package, capsys):
    assert main(["info", str(replaced_package)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((replaced_package / "diffrt.json").read_text())
    validation = manifest["components"]["text_encoder"]["validation"]
    for text in ("pipeline   StableDiffusionPipeline", "precision  fp32", "target     onnxruntime (opset 23)",
                 f"text_encoder: text_encoder/model.onnx, fp32, max abs diff {validation['max_abs_diff']:.3g} "
                 f"(bound {validation['tolerance']:.3g})",
                 "in  input_ids: int64 [batch, 77]", "out last_hidden_state: float32 [batch, 77, 32]",
                 "out hidden_states.5: float32 [batch, 77, 32]", "dims: batch 1..32", "engines    none"):
        assert text in out, text


def test_info_lists_tensorrt_engines(replaced_package, tmp_path, capsys):
    package = tmp_path / "pkg"
    shutil.copytree(replaced_package, package)
    engines = package / "unet" / "engines"
    engines.mkdir(parents=True)
    (engines / "abc123.json").write_text(json.dumps({"gpu": "NVIDIA H100", "sm": "9.0", "tensorrt": "10.13",
                                                     "precision": "fp16"}))
    (engines / "abc123.plan").write_bytes(b"plan")
    assert main(["info", str(package)]) == 0
    assert "unet/engines/abc123: gpu NVIDIA H100, sm 9.0, tensorrt 10.13, precision fp16" in capsys.readouterr().out


def test_info_of_a_folder_that_is_no_package_is_a_one_line_error(tmp_path):
    result = run_cli("info", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "diffrt info: error: `package` must be a model package folder with diffrt.json (diffrt's) or "
        f"model_index.json and ONNX components (Optimum's); got {str(tmp_path)!r}"
    ]


def test_info_and_help_do_not_import_torch(replaced_package):
    code = ("import sys; from diffrt.cli import main; main(['info', sys.argv[1]]); "
            "print('torch imported:', 'torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, str(replaced_package)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    help_text = run_cli("--help").stdout
    assert all(name in help_text for name in SUBCOMMANDS)


def test_export_script_is_the_export_subcommand():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: diffrt export" in result.stdout and "--precision {fp32,fp16,bf16}" in result.stdout
