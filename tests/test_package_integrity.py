"""A damaged package is found when it is opened, not after the UNet ran: file sizes recorded at export (always
checked) and sha256 (`verify=True`, `diffrt info --verify`), the ONNX graphs' inputs and outputs against the
manifest, and config values typed, ranged and consistent with the graphs. Packages written before sizes were
recorded still load."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_runner import one_line_error, run_cli

from diffrt import DiffusionPipeline
from diffrt.errors import PackageError
from diffrt.package.onnx_io import read_graph_io
from diffrt.package.reader import ModelPackage

DIGITS = Path(__file__).resolve().parents[1] / "diffrt" / "builtin_packages" / "digits"


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    return shutil.copytree(DIGITS, tmp_path / "digits")


def edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def unrecorded(package: Path) -> Path:
    """The package as diffrt wrote it before sizes and hashes were recorded."""
    manifest = json.loads((package / "diffrt.json").read_text())
    for entry in manifest["components"].values():
        entry.pop("files", None)
    (package / "diffrt.json").write_text(json.dumps(manifest))
    return package


# ----- sizes and hashes -----
def test_export_records_each_component_file_size_and_sha256(tiny_package) -> None:
    root = tiny_package("sd15")
    components = json.loads((root / "diffrt.json").read_text())["components"]
    for name, entry in components.items():
        files = entry["files"]
        expected = [entry["file"]] + ([f"{name}/{entry['external_data']}"] if entry["external_data"] else [])
        assert sorted(files) == sorted(expected), name
        for relative, record in files.items():
            data = (root / relative).read_bytes()
            assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ModelPackage.open(root).verify() == sum(len(e["files"]) for e in components.values())


def test_a_truncated_model_file_is_named_with_both_sizes_at_open(package: Path) -> None:
    model = package / "unet" / "model.onnx"
    size = model.stat().st_size
    with open(model, "r+b") as stream:
        stream.truncate(size - 1000)
    with pytest.raises(PackageError, match=rf"component `unet`: file .*unet/model.onnx has {size - 1000} bytes, the "
                                           rf"manifest records {size}"):
        DiffusionPipeline.from_pretrained(package)


def test_verify_finds_a_changed_byte_that_keeps_the_size(package: Path) -> None:
    model = package / "vae_decoder" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 0xFF  # inside the last initializer's bytes: the graph still parses, the weights differ
    model.write_bytes(bytes(data))
    DiffusionPipeline.from_pretrained(package)  # the size is right: opening does not hash
    with pytest.raises(PackageError, match=r"component `vae_decoder`: file .*vae_decoder/model.onnx has sha256 "
                                           r"[0-9a-f]{64}, the manifest records [0-9a-f]{64}"):
        DiffusionPipeline.from_pretrained(package, verify=True)
    result = run_cli("info", package, "--verify")
    one_line_error(result.stderr, "info", "vae_decoder/model.onnx", "sha256")


def test_info_verify_reports_the_files_it_hashed(package: Path) -> None:
    result = run_cli("info", package, "--verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "verified   4 files: sizes and sha256 match the manifest"


def test_packages_without_recorded_sizes_still_load_but_cannot_be_verified(package: Path) -> None:
    pipe = DiffusionPipeline.from_pretrained(unrecorded(package))
    assert pipe(prompt="a seven", num_inference_steps=2, generator=0, output_type="np").images.shape == (1, 32, 32, 3)
    with pytest.raises(PackageError, match=r"records no sha256 for its files .* nothing to verify against"):
        DiffusionPipeline.from_pretrained(package, verify=True)


# ----- graph inputs / outputs -----
def test_graph_io_is_read_without_onnx_and_equals_onnx(package: Path) -> None:
    import onnx

    for model in package.glob("*/model.onnx"):
        proto = onnx.load(model, load_external_data=False)
        inputs, outputs = read_graph_io(model)
        for ours, theirs in ((inputs, proto.graph.input), (outputs, proto.graph.output)):
            assert [t.name for t in ours] == [v.name for v in theirs]
            assert [t.dtype for t in ours] == [onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                                               for v in theirs]
            assert [t.shape for t in ours] == [tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                                     for d in v.type.tensor_type.shape.dim) for v in theirs]


def test_initializers_listed_as_inputs_in_old_graphs_are_not_inputs(tmp_path: Path) -> None:
    """ONNX IR < 4 lists every initializer among the graph inputs; ONNX Runtime does not feed them, neither do we."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((1, 2), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("Add", ["sample", "weight"], ["out_sample"])], "old",
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 2]),
                               helper.make_tensor_value_info("weight", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    onnx.save(model, tmp_path / "old.onnx")
    inputs, outputs = read_graph_io(tmp_path / "old.onnx")
    assert [t.name for t in inputs] == ["sample"] and [t.name for t in outputs] == ["out_sample"]


def test_a_model_file_swapped_for_another_components_is_named(package: Path) -> None:
    """Without recorded sizes (an older package), the wrong graph is still found before any engine is built."""
    shutil.copyfile(package / "vae_decoder" / "model.onnx", unrecorded(package) / "unet" / "model.onnx")
    with pytest.raises(PackageError, match=r"component `unet`: the graph .*unet/model.onnx does not match the "
                                           r"manifest: graph inputs latent_sample, manifest inputs "
                                           r"encoder_hidden_states, sample, timestep"):
        ModelPackage.open(package)


@pytest.mark.parametrize("change, message", [
    (lambda spec: spec.update(dtype="float16"), r"input `timestep` is float32 \[batch\] in the graph, float16 \["),
    (lambda spec: spec.update(shape=[]), r"input `timestep` is float32 \[batch\] in the graph, float32 \[\] in the"),
])
def test_manifest_io_that_differs_from_the_graph_is_named(package: Path, change, message: str) -> None:
    manifest = json.loads((package / "diffrt.json").read_text())
    change(next(s for s in manifest["components"]["unet"]["inputs"] if s["name"] == "timestep"))
    (package / "diffrt.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        ModelPackage.open(package)


def test_a_truncated_graph_without_recorded_sizes_is_named(package: Path) -> None:
    model = unrecorded(package) / "text_encoder" / "model.onnx"
    model.write_bytes(model.read_bytes()[:200])
    with pytest.raises(PackageError, match=r"text_encoder/model.onnx is not a readable ONNX model"):
        ModelPackage.open(package)


# ----- config values -----
VAE_CASES = [
    ({"scaling_factor": 0}, r"`scaling_factor` must be a finite number > 0; got 0"),
    ({"scaling_factor": -0.18}, r"`scaling_factor` must be a finite number > 0; got -0.18"),
    ({"scaling_factor": math.nan}, r"`scaling_factor` must be a finite number > 0; got nan"),
    ({"scaling_factor": "0.18215"}, r"`scaling_factor` must be a finite number > 0; got '0.18215'"),
    ({"scaling_factor": True}, r"`scaling_factor` must be a finite number > 0; got True"),
    ({"shift_factor": math.inf}, r"`shift_factor` must be a finite number \(or null\); got inf"),
    ({"block_out_channels": [16, 32, 32, 32]},
     r"`block_out_channels` gives a size factor of 8 \(2 \*\* \(len - 1\)\), but the graph was exported with factor 4"),
    ({"block_out_channels": []}, r"`block_out_channels` must be a non-empty list of positive integers; got \[\]"),
    ({"latent_channels": 16}, r"`latent_channels` gives 16, but the graph's `latent_sample` has 4 in dimension 1"),
    ({"latent_channels": 0}, r"`latent_channels` must be a positive integer; got 0"),
    ({"latents_mean": [0.1, 0.2], "latents_std": [1, 1, 1, 1]},
     r"`latents_mean` must be null or a list of 4 finite numbers"),
    ({"latents_mean": [0, 0, 0, 0], "latents_std": [1, 0, 1, 1]},
     r"`latents_std` must be null or a list of 4 positive finite numbers"),
]


@pytest.mark.parametrize("changes, message", VAE_CASES)
def test_vae_config_values_are_checked_at_open_naming_file_and_key(package: Path, changes, message: str) -> None:
    edit_json(package / "vae_decoder" / "config.json", **changes)
    with pytest.raises(PackageError, match=r"vae_decoder/config.json: " + message):
        DiffusionPipeline.from_pretrained(package)


@pytest.mark.parametrize("folder, changes, message", [
    ("unet", {"in_channels": 9}, r"`in_channels` gives 9, but the graph's `sample` has 4 in dimension 1"),
    ("unet", {"cross_attention_dim": 768},
     r"`cross_attention_dim` gives 768, but the graph's `encoder_hidden_states` has 32 in dimension 2"),
    ("unet", {"sample_size": 0}, r"`sample_size` must be a positive integer \(or a list of them\); got 0"),
    ("text_encoder", {"hidden_size": 768},
     r"`hidden_size` gives 768, but the graph's `last_hidden_state` has 32 in dimension 2"),
    ("vae_encoder", {"latent_channels": 3},
     r"2 x `latent_channels` gives 6, but the graph's `latent_parameters` has 8 in dimension 1"),
])
def test_other_config_values_must_fit_the_graph(package: Path, folder: str, changes, message: str) -> None:
    edit_json(package / folder / "config.json", **changes)
    with pytest.raises(PackageError, match=rf"{folder}/config.json: {message}"):
        ModelPackage.open(package)


def test_info_names_a_bad_config_in_one_line(package: Path) -> None:
    edit_json(package / "vae_decoder" / "config.json", scaling_factor=0)
    result = run_cli("info", package)
    one_line_error(result.stderr, "info", "vae_decoder/config.json", "`scaling_factor`", "> 0")
