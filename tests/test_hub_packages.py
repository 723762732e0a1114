"""Packages stored in a real Hugging Face cache layout (refs, blobs, snapshot symlinks into blobs) load offline, by
repo id, with Diffusers' Hub keywords (revision, cache_dir, local_files_only, subfolder, token, variant), through
`from_pretrained`, `diffrt generate` and `diffrt info`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runner import one_line_error, run_cli
from hub_cache import add_snapshot
from PIL import Image

from diffrt import DiffusionPipeline
from diffrt.errors import InputError, PackageError
from diffrt.package.reader import ModelPackage
from diffrt.runtime.pipelines.auto import AutoPipelineForText2Image

DIGITS = Path(__file__).resolve().parents[1] / "diffrt" / "builtin_packages" / "digits"
CALL = dict(prompt="a handwritten seven", num_inference_steps=3, generator=7, output_type="np")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME with the digits package as `someone/digits` (main) and a DDIM-scheduled copy as its tag `v1`."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(home / "hub", "someone/digits", DIGITS)
    add_snapshot(home / "hub", "someone/digits", ddim_digits(tmp_path / "ddim"), refs=("v1",))
    return home


def ddim_digits(folder: Path) -> Path:
    """The digits package with another scheduler and manifest date: the same weights, another image and info."""
    shutil.copytree(DIGITS, folder)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "_class_name": "DDIMScheduler"}))
    manifest = folder / "diffrt.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "created": "2030-01-01T00:00:00Z"}))
    return folder


def image(pipe: DiffusionPipeline) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**CALL).images


def test_the_cache_layout_is_the_real_one(home: Path) -> None:
    """Every file of the snapshot is a relative symlink that lands outside the snapshot folder, in blobs/."""
    repo = home / "hub" / "models--someone--digits"
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    model = snapshot / "unet" / "model.onnx"
    assert model.is_symlink() and not Path(model.readlink()).is_absolute()
    assert model.resolve().parent == (repo / "blobs").resolve()
    assert not model.resolve().is_relative_to(snapshot.resolve())


def test_a_package_in_the_hub_cache_loads_by_repo_id_and_equals_the_local_folder(home: Path) -> None:
    from_hub = DiffusionPipeline.from_pretrained("someone/digits")
    assert from_hub.package.root.parent.name == "snapshots"
    np.testing.assert_array_equal(image(from_hub), image(DiffusionPipeline.from_pretrained(DIGITS)))


def test_revision_picks_the_tag_and_the_commit(home: Path, tmp_path: Path) -> None:
    repo = home / "hub" / "models--someone--digits"
    tagged = DiffusionPipeline.from_pretrained("someone/digits", revision="v1")
    assert type(tagged.scheduler).__name__ == "DDIMScheduler"
    by_commit = DiffusionPipeline.from_pretrained("someone/digits", revision=(repo / "refs" / "v1").read_text())
    assert by_commit.package.root == tagged.package.root
    local = image(DiffusionPipeline.from_pretrained(tmp_path / "ddim"))
    np.testing.assert_array_equal(image(tagged), local)
    assert not np.array_equal(local, image(DiffusionPipeline.from_pretrained("someone/digits")))


def test_auto_pipelines_take_the_same_hub_keywords(home: Path) -> None:
    pipe = AutoPipelineForText2Image.from_pretrained("someone/digits", revision="v1", local_files_only=True,
                                                     token="hf_not_needed_offline", threads=1)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.engine_options == {"threads": 1}


def test_hub_keywords_are_never_engine_options(home: Path) -> None:
    """Diffusers' keywords were once accepted and then failed at the first call as options of provider 'cpu'."""
    pipe = DiffusionPipeline.from_pretrained("someone/digits", revision="main", token="hf_x", local_files_only=True,
                                             cache_dir=home / "hub", subfolder=None, variant="fp32", verify=True)
    assert pipe.engine_options == {}
    assert image(pipe).shape == (1, 32, 32, 3)


def test_cache_dir_replaces_the_environment_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    add_snapshot(tmp_path / "my_cache", "someone/digits", DIGITS)
    # local_files_only: no network even though offline mode is off
    pipe = DiffusionPipeline.from_pretrained("someone/digits", cache_dir=tmp_path / "my_cache", local_files_only=True)
    assert pipe.package.root.is_relative_to(tmp_path / "my_cache")
    with pytest.raises(PackageError, match=r"'someone/digits'.*not in the Hub cache .*empty_home"):
        DiffusionPipeline.from_pretrained("someone/digits", local_files_only=True)


def test_subfolder_names_the_package_inside_a_repo(home: Path, tmp_path: Path) -> None:
    add_snapshot(home / "hub", "someone/mixed", DIGITS, prefix="onnx/digits")
    pipe = DiffusionPipeline.from_pretrained("someone/mixed", subfolder="onnx/digits")
    assert pipe.package.root.name == "digits" and pipe.package.root.parent.name == "onnx"
    np.testing.assert_array_equal(image(pipe), image(DiffusionPipeline.from_pretrained(DIGITS)))
    local = DiffusionPipeline.from_pretrained(tmp_path.parent / tmp_path.name / "ddim", subfolder=".")
    assert local.package.root == tmp_path / "ddim"
    with pytest.raises(PackageError, match=r"`subfolder` 'onnx/nothing' does not exist in 'someone/mixed'"):
        DiffusionPipeline.from_pretrained("someone/mixed", subfolder="onnx/nothing")
    with pytest.raises(InputError, match=r"`subfolder` must be a relative folder inside the package repo"):
        DiffusionPipeline.from_pretrained("someone/mixed", subfolder="../x")


def test_variant_is_the_package_precision(home: Path) -> None:
    with pytest.raises(PackageError, match=r"`variant` 'fp16' asks for fp16 weights, but package .* holds fp32"):
        DiffusionPipeline.from_pretrained("someone/digits", variant="fp16")
    with pytest.raises(InputError, match=r"`variant` must be None or one of fp32, fp16, bf16 .*; got 'ema'"):
        DiffusionPipeline.from_pretrained("someone/digits", variant="ema")


def test_a_missing_blob_is_named_before_any_engine_is_built(home: Path) -> None:
    """An interrupted download: the snapshot's symlink exists, its blob does not."""
    repo = home / "hub" / "models--someone--digits"
    blob = (repo / "snapshots" / (repo / "refs" / "main").read_text() / "unet" / "model.onnx").resolve()
    blob.unlink()
    with pytest.raises(PackageError, match=r"component `unet`: model file .*snapshots/.*/unet/model.onnx is missing"):
        DiffusionPipeline.from_pretrained("someone/digits")


@pytest.mark.parametrize("file", ["../../blobs/x", "/etc/passwd", "unet/../../outside.onnx", "C:\\model.onnx"])
def test_manifest_paths_that_leave_the_package_are_refused(tmp_path: Path, file: str) -> None:
    package = shutil.copytree(DIGITS, tmp_path / "pkg")
    manifest = json.loads((package / "diffrt.json").read_text())
    manifest["components"]["unet"]["file"] = file
    (package / "diffrt.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=r"component `unet`: `file` must stay inside the package"):
        ModelPackage.open(package)


def test_generate_and_info_take_a_repo_id_and_revision(home: Path, tmp_path: Path) -> None:
    env = dict(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_CACHE=None)
    made = {}
    for revision in ("main", "v1"):
        out = tmp_path / f"{revision}.png"
        result = run_cli("generate", "someone/digits", "a handwritten seven", "--steps", "3", "--seed", "7",
                         "--revision", revision, "-o", out, **env)
        assert result.returncode == 0, result.stderr
        made[revision] = np.asarray(Image.open(out))
    local = run_cli("generate", tmp_path / "ddim", "a handwritten seven", "--steps", "3", "--seed", "7",
                    "-o", tmp_path / "local.png")
    assert local.returncode == 0, local.stderr
    np.testing.assert_array_equal(made["v1"], np.asarray(Image.open(tmp_path / "local.png")))
    assert not np.array_equal(made["main"], made["v1"])

    main, tagged = (run_cli("info", "someone/digits", *extra, **env) for extra in ((), ("--revision", "v1")))
    assert main.returncode == tagged.returncode == 0, main.stderr + tagged.stderr
    assert "2030-01-01T00:00:00Z" in tagged.stdout and "2030-01-01T00:00:00Z" not in main.stdout
    verified = run_cli("info", "someone/digits", "--revision", "v1", "--verify", **env)
    assert verified.returncode == 0 and "verified   4 files" in verified.stdout, verified.stderr
    missing = run_cli("info", "someone/digits", "--revision", "v9", **env)
    one_line_error(missing.stderr, "info", "someone/digits", "v9", "offline")
