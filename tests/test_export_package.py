"""The model package writer: documented layout, model_index.json, the diffrt.json schema, tokenizers, atomicity.

Packages come from the session fixture `tiny_package(kind)` (tests/checkpoint_fixtures.py: a full fp32 export of a
tiny checkpoint, shared with the runtime tests); the schema and layout are checked against docs/package-format.md.
"""
from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from diffrt.errors import ExportError, InputError
from diffrt.export import check_options, export_pipeline
from diffrt.export.precision import component_precision
from diffrt.export.tokenizers import write_tokenizer
from diffrt.package.files import default_mode
from diffrt.package.writer import PackageWriter

PROMPTS = ["a photo of a cat sitting on a red chair", "", "cat ! dog !!", "A Painting of an astronaut " * 20]
ONNX_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _leftovers(folder: Path, name: str = "") -> list[str]:
    """Temporary folders the writer may leave beside a package NAME (`.NAME.tmp-*`, `.NAME.old-*`)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}"))


def check_manifest_schema(package: Path) -> dict:
    """Every rule of docs/package-format.md for diffrt.json; returns the manifest."""
    manifest = _json(package / "diffrt.json")
    assert list(manifest) == ["format", "format_version", "pipeline", "source", "precision", "target", "opset",
                              "exporter", "created", "components"]
    assert manifest["format"] == "diffrt-package" and manifest["format_version"] == 1
    assert manifest["precision"] in ("fp32", "fp16", "bf16")
    assert manifest["target"] in ("onnxruntime", "tensorrt", "cuda")
    assert isinstance(manifest["opset"], int)
    assert set(manifest["source"]) == {"id", "revision", "kind", "weights_sha256"}
    assert manifest["source"]["kind"] in ("hub", "folder", "single_file")
    assert {"diffrt", "torch", "onnx", "transformers"} <= set(manifest["exporter"])
    assert manifest["created"].endswith("Z")
    for name, entry in manifest["components"].items():
        assert name in ONNX_COMPONENTS
        mapped = ["parameters"] if name in ("unet", "text_encoder", "text_encoder_2") else []
        assert list(entry) == ["file", "external_data", "precision", "opset", "inputs", "outputs", "dims",
                               "validation", "files", *mapped]
        for located in entry.get("parameters", {}).values():
            assert located and all(layout in ("direct", "transposed") for _, layout in located), located
        assert all(set(record) == {"size", "sha256"} for record in entry["files"].values())
        assert isinstance(entry["opset"], int) and (manifest["target"] == "cuda" or entry["opset"] == manifest["opset"])
        assert entry["file"] == f"{name}/model.onnx" and (package / entry["file"]).is_file()
        if entry["external_data"] is not None:
            assert (package / name / entry["external_data"]).is_file()
        for low_high in entry["dims"].values():
            assert len(low_high) == 2 and all(isinstance(v, int) for v in low_high) and low_high[0] <= low_high[1]
        for io in entry["inputs"] + entry["outputs"]:
            assert set(io) == {"name", "dtype", "shape"} and io["dtype"] in ("float32", "int64")
            assert all(isinstance(d, int) or d in entry["dims"] for d in io["shape"]), io
        if entry["validation"] is not None:
            assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]
    return manifest


def test_package_has_the_documented_layout(tiny_package):
    package = tiny_package("sd15")
    expected = [
        "model_index.json", "diffrt.json", "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
        "text_encoder/model.onnx", "text_encoder/config.json", "unet/model.onnx", "unet/config.json",
        "vae_encoder/model.onnx", "vae_encoder/config.json", "vae_decoder/model.onnx", "vae_decoder/config.json",
    ]
    missing = [name for name in expected if not (package / name).is_file()]
    assert not missing
    for name in ("diffrt.json", "model_index.json", "tokenizer/tokenizer.json"):  # readable like any file
        assert stat.S_IMODE((package / name).stat().st_mode) == default_mode(), name
    assert not (package / "vae").exists() and not (package / "unet" / "model.onnx_data").exists()
    assert _leftovers(package.parent, package.name) == []


def test_model_index_lists_exactly_the_exported_components(tiny_package, tiny_checkpoint):
    index = _json(tiny_package("sd15") / "model_index.json")
    source = _json(tiny_checkpoint("sd15") / "model_index.json")
    listed = {key for key, value in index.items() if isinstance(value, list)}
    assert listed == {"text_encoder", "tokenizer", "unet", "vae_encoder", "vae_decoder", "scheduler"}
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == source["scheduler"] and index["tokenizer"] == source["tokenizer"]
    assert index["requires_safety_checker"] == source["requires_safety_checker"]


def test_manifest_follows_the_schema_and_records_the_source(tiny_package, tiny_checkpoint):
    package, source = tiny_package("sd15"), tiny_checkpoint("sd15")
    manifest = check_manifest_schema(package)
    assert manifest["pipeline"] == "StableDiffusionPipeline"
    assert (manifest["precision"], manifest["target"], manifest["opset"]) == ("fp32", "onnxruntime", 23)
    assert manifest["exporter"]["onnx"] == onnx.__version__
    assert list(manifest["components"]) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    hashes = manifest["source"]["weights_sha256"]
    assert set(hashes) == {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                           "vae/diffusion_pytorch_model.safetensors"}
    for rel, digest in hashes.items():
        assert hashlib.sha256((source / rel).read_bytes()).hexdigest() == digest


def test_manifest_io_matches_the_onnx_graphs(tiny_package):
    package = tiny_package("sd15")
    manifest = _json(package / "diffrt.json")
    numpy_of = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    for name, entry in manifest["components"].items():
        session = ort.InferenceSession(str(package / entry["file"]), providers=["CPUExecutionProvider"])
        for declared, actual in ((entry["inputs"], session.get_inputs()), (entry["outputs"], session.get_outputs())):
            assert [io["name"] for io in declared] == [a.name for a in actual], name
            assert [io["dtype"] for io in declared] == [numpy_of[a.type] for a in actual], name
            assert [io["shape"] for io in declared] == [list(a.shape) for a in actual], name


def test_unet_dims_are_the_documented_dynamic_axes(tiny_package):
    unet = _json(tiny_package("sd15") / "diffrt.json")["components"]["unet"]
    assert [io["shape"] for io in unet["inputs"]] == [["batch", 4, "height", "width"], ["batch"],
                                                       ["batch", "sequence", 32]]
    assert set(unet["dims"]) == {"batch", "height", "width", "sequence"}
    assert unet["dims"]["sequence"][0] == 77


def test_configs_are_copied_unchanged(tiny_package, tiny_checkpoint):
    package, source = tiny_package("sd15"), tiny_checkpoint("sd15")
    pairs = [("unet/config.json", "unet/config.json"), ("vae_decoder/config.json", "vae/config.json"),
             ("vae_encoder/config.json", "vae/config.json"), ("text_encoder/config.json", "text_encoder/config.json"),
             ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
             ("tokenizer/tokenizer_config.json", "tokenizer/tokenizer_config.json")]
    for ours, theirs in pairs:
        assert (package / ours).read_bytes() == (source / theirs).read_bytes(), ours


def test_runtime_package_reader_opens_the_package(tiny_package):
    from diffrt.package.reader import ModelPackage

    package = ModelPackage.open(tiny_package("sd15"))
    assert package.pipeline_class == "StableDiffusionPipeline"
    assert set(package.components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert package.component("unet").dim_ranges["batch"] == (1, 32)


def _transformers_ids(folder: Path, prompt: str) -> list[int]:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids


def _tokenizer_json_ids(folder: Path, prompt: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids


def test_packaged_tokenizer_json_gives_transformers_ids(tiny_package, tiny_checkpoint):
    package, source = tiny_package("sd15"), tiny_checkpoint("sd15")
    for prompt in PROMPTS:
        assert _tokenizer_json_ids(package / "tokenizer", prompt) == _transformers_ids(source / "tokenizer", prompt)


@pytest.mark.parametrize(("kind", "folder"), [("sd2", "tokenizer"), ("sdxl", "tokenizer_2"), ("sdxl", "tokenizer")])
def test_tokenizer_json_keeps_the_pad_token(tiny_checkpoint, tmp_path, kind, folder):
    source = tiny_checkpoint(kind) / folder
    write_tokenizer(source, tmp_path / folder)
    pad = _json(source / "tokenizer_config.json")["pad_token"]
    assert _json(tmp_path / folder / "tokenizer_config.json")["pad_token"] == pad
    for prompt in PROMPTS:
        ids = _tokenizer_json_ids(tmp_path / folder, prompt)
        assert ids == _transformers_ids(source, prompt)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tmp_path / folder / "tokenizer.json"))
    assert tokenizer.padding["pad_token"] == pad and tokenizer.padding["pad_id"] == tokenizer.token_to_id(pad)
    assert _tokenizer_json_ids(tmp_path / folder, "a cat")[-1] == tokenizer.token_to_id(pad)


def test_tokenizer_json_is_built_from_vocab_and_merges(tmp_path):
    """Hub SD checkpoints ship vocab.json + merges.txt without tokenizer.json; the package gets one."""
    from checkpoint_fixtures import write_clip_tokenizer_files

    source = tmp_path / "source"
    write_clip_tokenizer_files(source)
    config = {"model_max_length": 77, "pad_token": "!", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    write_tokenizer(source, tmp_path / "out")
    assert (tmp_path / "out" / "vocab.json").read_bytes() == (source / "vocab.json").read_bytes()
    assert (tmp_path / "out" / "merges.txt").read_bytes() == (source / "merges.txt").read_bytes()
    for prompt in PROMPTS:
        assert _tokenizer_json_ids(tmp_path / "out", prompt) == _transformers_ids(source, prompt)


def test_writer_renames_into_place_only_on_success(tmp_path):
    output = tmp_path / "pkg"
    with pytest.raises(RuntimeError, match="boom"):
        with PackageWriter(output) as folder:
            (folder / "model_index.json").write_text("{}")
            raise RuntimeError("boom")
    assert not output.exists() and _leftovers(tmp_path) == []
    with PackageWriter(output) as folder:
        assert folder.parent == tmp_path and folder.name.startswith(".pkg.tmp-")
        (folder / "model_index.json").write_text("{}")
        assert not output.exists()
    assert (output / "model_index.json").is_file() and _leftovers(tmp_path) == []
    assert stat.S_IMODE(output.stat().st_mode) == default_mode(directory=True)  # not mkdtemp's private 0700


def test_writer_replaces_an_existing_package_only_with_overwrite(tmp_path):
    output = tmp_path / "pkg"
    (output / "unet").mkdir(parents=True)
    (output / "diffrt.json").write_text(json.dumps({"format": "diffrt-package", "components": {"unet": {}}}))
    (output / "unet" / "model.onnx").write_bytes(b"old")
    with pytest.raises(InputError, match="`output`"):
        PackageWriter(output).__enter__()
    assert _leftovers(tmp_path) == [] and (output / "unet" / "model.onnx").is_file()
    with PackageWriter(output, overwrite=True) as folder:
        (folder / "new.txt").write_text("new")
        assert (output / "unet" / "model.onnx").is_file()  # the old package stays until the new one is complete
    assert sorted(p.name for p in output.iterdir()) == ["new.txt"] and _leftovers(tmp_path) == []


def test_failed_validation_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    output = tmp_path / "pkg"
    with pytest.raises(ExportError, match="text_encoder.*bound"):
        export_pipeline(tiny_checkpoint("sd15"), output, components=["text_encoder"], tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_loading(tiny_checkpoint, tmp_path):
    output = tmp_path / "pkg"
    output.mkdir()
    with pytest.raises(InputError, match="`output` must be a path that does not exist yet"):
        export_pipeline(tiny_checkpoint("sd15"), output, components=["unet"])
    assert list(tmp_path.iterdir()) == [output] and list(output.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"precision": "fp8"}, "`precision` must be one of fp32, fp16, bf16; got 'fp8'"),
    ({"target": "coreml"}, "`target` must be one of onnxruntime, tensorrt, cuda; got 'coreml'"),
    ({"opset": 17}, r"`opset` must be None or an int in \[18, 23\]; got 17"),
    ({"target": "cuda", "opset": 23}, r"`opset` must be 18 \(or None\) with target cuda"),
    ({"target": "cuda", "precision": "bf16"}, r"`precision` must be fp32 or fp16 with target cuda"),
    ({"precision": "bf16", "target": "tensorrt"}, "`opset` must be >= 22 for precision bf16"),
    ({"components": ["unet", "safety_checker"]}, "`components` must be names from .*; got 'safety_checker'"),
    ({"components": "unet"}, "`components` must be None or a non-empty list"),
    ({"tolerance": -1.0}, "`tolerance` must be None or a positive number"),
])
def test_argument_errors_name_the_parameter(kwargs, message):
    with pytest.raises(InputError, match=message):
        check_options(**kwargs)


def test_default_opsets_per_target():
    assert check_options().opset == 23
    assert check_options(target="tensorrt").opset == 18
    assert check_options(target="cuda").opset == 18
    assert check_options(precision="bf16", target="tensorrt", opset=22).opset == 22


@pytest.mark.parametrize(("pipeline", "name", "force_upcast", "expected"), [
    ("StableDiffusionXLPipeline", "vae_decoder", True, "fp32"),  # the original SDXL VAE overflows float16
    ("StableDiffusionXLImg2ImgPipeline", "vae_encoder", True, "fp32"),
    ("StableDiffusionXLPipeline", "vae_decoder", False, "fp16"),  # the fp16-fix VAE
    ("StableDiffusionPipeline", "vae_decoder", True, "fp16"),  # diffusers upcasts only in the SDXL family
    ("StableDiffusionXLPipeline", "unet", True, "fp16"),
])
def test_vae_float32_island_follows_force_upcast(pipeline, name, force_upcast, expected):
    assert component_precision(name, "fp16", pipeline, {"force_upcast": force_upcast}) == expected
    assert component_precision(name, "fp32", pipeline, {"force_upcast": force_upcast}) == "fp32"
