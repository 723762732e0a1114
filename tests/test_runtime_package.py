"""ModelPackage and resolve_package on hand-built package folders (tiny ONNX files + JSON) and a hand-built HF cache."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import save_graph

from diffrt.errors import InputError, PackageError
from diffrt.package.reader import ModelPackage, strip_class_prefix
from diffrt.runtime.engines import create_engine
from diffrt.runtime.hub import resolve_package

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
# component -> (inputs, outputs); each output is the first input passed through (Identity): enough to load and run.
IO = {
    "text_encoder": ([("input_ids", INT64, ["batch", 77])], [("last_hidden_state", INT64, ["batch", 77])]),
    "unet": (
        [("sample", FLOAT, ["batch", 4, "height", "width"]), ("timestep", FLOAT, ["batch"]),
         ("encoder_hidden_states", FLOAT, ["batch", 77, 32])],
        [("out_sample", FLOAT, ["batch", 4, "height", "width"])],
    ),
    "vae_decoder": ([("latent_sample", FLOAT, ["batch", 4, "h", "w"])], [("sample", FLOAT, ["batch", 4, "h", "w"])]),
    "vae_encoder": (
        [("sample", FLOAT, ["batch", 3, "H", "W"])], [("latent_parameters", FLOAT, ["batch", 3, "H", "W"])]
    ),
}
VAE_CONFIG = {"_class_name": "AutoencoderKL", "scaling_factor": 0.13025, "block_out_channels": [8, 16, 16, 16]}
UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4}
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}
DTYPES = {FLOAT: "float32", INT64: "int64"}


def write_onnx(path: Path, name: str) -> None:
    inputs, outputs = IO[name]
    save_graph(path, [helper.make_node("Identity", [inputs[0][0]], [outputs[0][0]])],
               [helper.make_tensor_value_info(*spec) for spec in inputs],
               [helper.make_tensor_value_info(*spec) for spec in outputs], name=name)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def manifest_entry(name: str) -> dict[str, Any]:
    inputs, outputs = IO[name]
    spec = lambda s: {"name": s[0], "dtype": DTYPES[s[1]], "shape": s[2]}  # noqa: E731
    return {
        "file": f"{name}/model.onnx", "external_data": None, "precision": "fp32",
        "inputs": [spec(s) for s in inputs], "outputs": [spec(s) for s in outputs],
        "dims": {"batch": [1, 4], "height": [4, 16], "width": [4, 16]} if name == "unet" else {"batch": [1, 4]},
        "validation": {"max_abs_diff": 1e-6, "tolerance": 1e-4},
    }


def make_package(root: Path, optimum: bool = False, class_name: str | None = None) -> Path:
    """A package in our layout (with diffrt.json) or Optimum's (ORT class name, OnnxRuntimeModel entries)."""
    names = list(IO)
    index: dict[str, Any] = {
        "_class_name": class_name or ("ORTStableDiffusionPipeline" if optimum else "StableDiffusionPipeline"),
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    for name in names:
        index[name] = ["diffusers", "OnnxRuntimeModel"] if optimum else (
            ["transformers", "CLIPTextModel"] if name == "text_encoder" else ["diffusers", "OnnxRuntimeModel"])
    write_json(root / "model_index.json", index)
    write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER)
    write_json(root / "tokenizer" / "tokenizer_config.json", {"model_max_length": 77})
    for name in names:
        write_onnx(root / name / "model.onnx", name)
        config = {"text_encoder": {"hidden_size": 32}, "unet": UNET_CONFIG}.get(name, VAE_CONFIG)
        write_json(root / name / "config.json", config)
    if not optimum:
        write_json(root / "diffrt.json", {
            "format": "diffrt-package", "format_version": 1, "pipeline": "StableDiffusionPipeline",
            "precision": "fp32", "target": "onnxruntime", "opset": 17,
            "components": {name: manifest_entry(name) for name in names},
        })
    return root


@pytest.fixture()
def package_dir(tmp_path: Path) -> Path:
    return make_package(tmp_path / "pkg")


# ----- reading -----
def test_open_reads_a_diffrt_package(package_dir: Path) -> None:
    package = ModelPackage.open(package_dir)
    assert package.pipeline_class == "StableDiffusionPipeline"
    assert package.format_version == 1 and package.manifest["target"] == "onnxruntime"
    assert sorted(package.components) == sorted(IO)
    unet = package.component("unet")
    assert unet.path == package_dir / "unet" / "model.onnx" and unet.config == UNET_CONFIG
    assert unet.manifest["validation"]["tolerance"] == 1e-4
    assert unet.dim_ranges == {"batch": (1, 4), "height": (4, 16), "width": (4, 16)}
    sample = unet.inputs[0]
    assert (sample.name, sample.dtype, sample.shape) == ("sample", np.float32, ("batch", 4, "height", "width"))
    assert package.scheduler_config == SCHEDULER
    assert package.tokenizer_dirs == {"tokenizer": package_dir / "tokenizer"}
    assert package.tokenizer_dir("tokenizer") == package_dir / "tokenizer"
    assert package.vae_config["scaling_factor"] == 0.13025 and package.unet_config["sample_size"] == 8


def test_open_reads_an_optimum_package_without_manifest(tmp_path: Path) -> None:
    root = make_package(tmp_path / "optimum", optimum=True, class_name="ORTStableDiffusionXLPipeline")
    (root / "vae_encoder" / "model.onnx").unlink()
    (root / "vae_encoder" / "config.json").unlink()
    (root / "vae_encoder").rmdir()
    index = json.loads((root / "model_index.json").read_text())
    write_json(root / "model_index.json", {**index, "vae_encoder": [None, None]})
    package = ModelPackage.open(root)
    assert package.manifest is None and package.format_version is None
    assert package.pipeline_class == "StableDiffusionXLPipeline"
    assert sorted(package.components) == ["text_encoder", "unet", "vae_decoder"]
    assert package.component("unet").manifest is None and package.component("unet").dim_ranges == {}
    assert not package.has("vae_encoder") and package.has("scheduler") and package.has("tokenizer")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ORTStableDiffusionPipeline", "StableDiffusionPipeline"),
        ("ORTLatentConsistencyModelPipeline", "LatentConsistencyModelPipeline"),
        ("OnnxStableDiffusionInpaintPipeline", "StableDiffusionInpaintPipeline"),
        ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLImg2ImgPipeline"),
        ("ORTopia", "ORTopia"),
    ],
)
def test_class_prefixes_of_onnx_pipelines_are_stripped(name: str, expected: str) -> None:
    assert strip_class_prefix(name) == expected


def test_components_run_through_create_engine_with_manifest_ranges(package_dir: Path) -> None:
    unet = create_engine(ModelPackage.open(package_dir).component("unet"), threads=1)
    feeds = {
        "sample": np.arange(2 * 4 * 8 * 8, dtype=np.float32).reshape(2, 4, 8, 8),
        "timestep": np.array([999.0, 999.0], np.float32),
        "encoder_hidden_states": np.zeros((2, 77, 32), np.float32),
    }
    np.testing.assert_array_equal(unet.run(feeds)["out_sample"], feeds["sample"])
    with pytest.raises(InputError, match=r"`sample` dimension 2 \('height'\) must be in \[4, 16\]; got 32"):
        unet.run({**feeds, "sample": np.zeros((2, 4, 32, 8), np.float32)})


# ----- validation -----
def test_require_names_every_missing_part(package_dir: Path) -> None:
    package = ModelPackage.open(package_dir)
    package.require("unet", "vae_decoder", "text_encoder", "tokenizer", "scheduler")
    with pytest.raises(PackageError, match=r"lacks text_encoder_2, tokenizer_2, which this pipeline needs; it has: "):
        package.require("unet", "text_encoder_2", "tokenizer_2")
    with pytest.raises(PackageError, match="has no `text_encoder_2` component; it has: text_encoder, unet"):
        package.component("text_encoder_2")
    with pytest.raises(PackageError, match="has no `tokenizer_2` folder; tokenizers: tokenizer"):
        package.tokenizer_dir("tokenizer_2")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "model_index.json").unlink(), r"is not a model package: it has no model_index.json"),
        (lambda r: (r / "unet" / "model.onnx").unlink(), r"component `unet`: model file .*unet/model.onnx is missing"),
        (lambda r: (r / "scheduler" / "scheduler_config.json").unlink(), r"scheduler_config.json is missing"),
        (lambda r: _remove_tree(r / "tokenizer"), r"tokenizer folder .*tokenizer is missing \(model_index.json"),
        (lambda r: (r / "model_index.json").write_text("{oops"), r"model_index.json is not valid JSON"),
        (lambda r: (r / "diffrt.json").write_text("[1, 2"), r"diffrt.json is not valid JSON"),
        (lambda r: (r / "unet" / "config.json").write_text("{"), r"unet/config.json is not valid JSON"),
        (lambda r: (r / "scheduler" / "scheduler_config.json").write_text("[]"), r"must hold a JSON object; got list"),
        (lambda r: _edit_manifest(r, format_version=2), r"`format_version` must be one of \[1\] .*; got 2"),
        (lambda r: _edit_manifest(r, format_version="1"), r"`format_version` must be one of \[1\] .*; got '1'"),
        (lambda r: _edit_manifest(r, format="other"), r"`format` must be 'diffrt-package'; got 'other'"),
        (lambda r: _edit_component(r, file="../../etc/passwd"), r"`file` must stay inside the package"),
        (lambda r: _edit_component(r, dims={"batch": [4, 1]}), r"component `unet` has an invalid `dims`"),
        (lambda r: _edit_component(r, external_data="model.onnx_data"), r"external data file model.onnx_data is"),
    ],
)
def test_broken_packages_raise_package_error_naming_the_file(package_dir: Path, damage, message: str) -> None:
    damage(package_dir)
    with pytest.raises(PackageError, match=message):
        ModelPackage.open(package_dir)


def test_optimum_package_missing_a_listed_component_folder_is_named(tmp_path: Path) -> None:
    root = make_package(tmp_path / "optimum", optimum=True)
    _remove_tree(root / "vae_decoder")
    with pytest.raises(PackageError, match=r"`vae_decoder` is listed in model_index.json but its folder .* missing"):
        ModelPackage.open(root)


def test_missing_configs_are_named_when_needed(package_dir: Path) -> None:
    for name in ("vae_decoder", "vae_encoder"):
        (package_dir / name / "config.json").unlink()
    (package_dir / "unet" / "config.json").unlink()
    package = ModelPackage.open(package_dir)
    with pytest.raises(PackageError, match=r"vae_decoder/config.json is missing; the runtime needs it for the VAE"):
        package.vae_config
    with pytest.raises(PackageError, match=r"unet/config.json is missing"):
        package.unet_config
    with pytest.raises(PackageError, match="model package folder .*nowhere does not exist"):
        ModelPackage.open(package_dir / "nowhere")


def _remove_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    folder.rmdir()


def _edit_manifest(root: Path, **changes: Any) -> None:
    manifest = json.loads((root / "diffrt.json").read_text())
    write_json(root / "diffrt.json", {**manifest, **changes})


def _edit_component(root: Path, **changes: Any) -> None:
    manifest = json.loads((root / "diffrt.json").read_text())
    manifest["components"]["unet"].update(changes)
    write_json(root / "diffrt.json", manifest)


# ----- hub -----
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME in offline mode: nothing in these tests may reach the network."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_repo(hub_cache: Path, repo_id: str) -> Path:
    """The HF cache layout: models--owner--name/{refs/main, snapshots/<commit>/...} with a package inside."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = make_package(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_local_folder_resolves_to_itself(package_dir: Path, offline_home: Path) -> None:
    assert resolve_package(package_dir) == package_dir
    assert resolve_package(str(package_dir)) == package_dir


def test_cached_hub_repo_resolves_offline(offline_home: Path) -> None:
    snapshot = cache_repo(offline_home / "hub", "o/n")
    assert resolve_package("o/n") == snapshot
    assert resolve_package("o/n", revision=COMMIT) == snapshot
    assert ModelPackage.open(resolve_package("o/n")).pipeline_class == "StableDiffusionPipeline"


def test_hf_hub_cache_overrides_hf_home(offline_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = cache_repo(tmp_path / "elsewhere", "o/n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert resolve_package("o/n") == snapshot


def test_uncached_repo_offline_is_a_clear_package_error(offline_home: Path) -> None:
    cache_repo(offline_home / "hub", "o/n")
    with pytest.raises(PackageError, match=r"package files of Hub repo 'o/missing' \(revision main\): not in the Hub "
                                           r"cache .*hf_home/hub, and offline mode is on \(HF_HUB_OFFLINE=1\)"):
        resolve_package("o/missing")
    with pytest.raises(PackageError, match=r"Hub repo 'o/n' \(revision v2\): not in the Hub cache"):
        resolve_package("o/n", revision="v2")


@pytest.mark.parametrize("name", ["./no/such/folder", "/no/such/folder", "a/b/c", "not a repo id!"])
def test_missing_paths_and_invalid_ids_are_named(offline_home: Path, name: str) -> None:
    with pytest.raises(PackageError, match=r"`name_or_path` must be a model package folder or a Hub repo id; no "):
        resolve_package(name)


# ----- import hygiene -----
def test_runtime_modules_never_import_torch_transformers_or_diffusers() -> None:
    code = (
        "import sys\n"
        "import diffrt.runtime.engines, diffrt.runtime.engines.onnxruntime, diffrt.runtime.tokenizer\n"
        "import diffrt.package.reader, diffrt.runtime.image, diffrt.runtime.hub\n"
        "diffrt.runtime.hub._valid_repo_id('o/n')\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.strip() == ""
