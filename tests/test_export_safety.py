"""Export never loses data: what --overwrite may replace, sources apart from the output, checkpoints diffrt cannot
export refused before anything is written, killed runs' temp folders cleaned up, disk errors named, damaged weights
found before the first component, per-component progress.

Everything runs on real folders: the user's files and the checkpoints are compared byte for byte afterwards, the
killed export is a real `diffrt export` process killed with SIGKILL.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import cli_env, one_line_error, run_cli

from diffrt.cli import main
from diffrt.errors import ConfigError, ExportError
from diffrt.export import export_pipeline
from diffrt.package.leftovers import host_name, remove_stale_temp

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under `folder` (itself included): file bytes (None for folders) and permission bits."""
    entries = {".": (None, folder.stat().st_mode)}
    for path in sorted(folder.rglob("*")):
        entries[path.relative_to(folder).as_posix()] = (path.read_bytes() if path.is_file() else None,
                                                        path.stat().st_mode)
    return entries


def user_folder(root: Path) -> Path:
    """A folder of a user's own files (text, binary, nested, hidden)."""
    folder = root / "my_files"
    (folder / "notes" / "deep").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\section{Results}")
    (folder / "notes" / "deep" / "data.bin").write_bytes(os.urandom(4096))
    (folder / ".hidden").write_text("secret")
    return folder


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny SD 1.x checkpoint (the tests may try to damage it)."""
    return Path(shutil.copytree(tiny_checkpoint("sd15"), tmp_path / "ck"))


def export_refused(capsys, *args: str | Path, fragments: tuple[str, ...], code: int = 2) -> str:
    """`diffrt export ARGS` in this process fails with `code` and one error line holding every fragment (output
    printed before it, such as a fixture building its checkpoint, is dropped first)."""
    capsys.readouterr()
    assert main(["export", *map(str, args)]) == code
    return one_line_error(capsys.readouterr().err, "export", *fragments)


# --- --overwrite replaces only a model package ---------------------------------------------------------------------


def test_overwrite_never_replaces_a_folder_of_user_files(tiny_checkpoint, tmp_path, capsys):
    folder = user_folder(tmp_path)
    before = snapshot(folder)
    export_refused(capsys, str(tiny_checkpoint("sd15")), str(folder), "--overwrite",
                   fragments=("`output`", str(folder), "not a model package", "--overwrite replaces only"))
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["my_files"]


def test_export_onto_its_own_source_is_refused_and_the_checkpoint_survives(checkpoint_copy, capsys):
    before = snapshot(checkpoint_copy)
    export_refused(capsys, str(checkpoint_copy), str(checkpoint_copy), "--overwrite",
                   fragments=("`output`", "is the source checkpoint"))
    assert snapshot(checkpoint_copy) == before
    assert sorted(p.name for p in checkpoint_copy.parent.iterdir()) == ["ck"]


def test_a_symlink_to_the_source_is_the_source(checkpoint_copy, capsys):
    link = checkpoint_copy.parent / "link"
    link.symlink_to(checkpoint_copy)
    before = snapshot(checkpoint_copy)
    export_refused(capsys, str(checkpoint_copy), str(link), "--overwrite",
                   fragments=("`output`", str(link), "is the source checkpoint"))
    assert snapshot(checkpoint_copy) == before and link.is_symlink()


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_inside_the_source_is_refused(checkpoint_copy, capsys, overwrite):
    before = snapshot(checkpoint_copy)
    export_refused(capsys, str(checkpoint_copy), str(checkpoint_copy / "pkg"), *(["--overwrite"] * overwrite),
                   fragments=("`output`", "lies inside the source checkpoint"))
    assert snapshot(checkpoint_copy) == before


def test_output_holding_the_source_is_refused(checkpoint_copy, capsys):
    parent = checkpoint_copy.parent
    before = snapshot(parent)
    export_refused(capsys, str(checkpoint_copy), str(parent), "--overwrite",
                   fragments=("`output`", "holds the source checkpoint"))
    assert snapshot(parent) == before


def test_single_file_source_inside_the_output_is_refused(checkpoint_copy, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    single = folder / "model.safetensors"
    shutil.copyfile(checkpoint_copy / UNET_WEIGHTS, single)
    before = snapshot(folder)
    export_refused(capsys, str(single), str(folder), "--overwrite",
                   fragments=("`output`", "holds the source checkpoint", str(single)))
    export_refused(capsys, str(single), str(single), "--overwrite",
                   fragments=("`output`", "is the source checkpoint"))
    assert snapshot(folder) == before


def test_overwrite_replaces_a_diffrt_package_and_an_optimum_layout_package(tiny_checkpoint, tiny_package, tmp_path):
    ours = Path(shutil.copytree(tiny_package("sd15"), tmp_path / "ours"))
    (ours / f".tiny_vae.tmp-{_dead_pid()}@{host_name()}-abcd1234").mkdir()  # a killed `--into` addition's scratch
    optimum = Path(shutil.copytree(tiny_package("sd15"), tmp_path / "optimum"))
    (optimum / "diffrt.json").unlink()  # Optimum's layout: model_index.json and ONNX component folders, no manifest
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (ours, optimum, empty):
        export_pipeline(tiny_checkpoint("sd15"), output, components=["text_encoder"], overwrite=True)
        manifest = json.loads((output / "diffrt.json").read_text())
        assert list(manifest["components"]) == ["text_encoder"] and not (output / "unet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "optimum", "ours"]


@pytest.mark.parametrize(("extra", "fragments"), [
    ("README.md", ("README.md", "which a model package does not")),
    (".git/config", (".git", "which a model package does not")),
    ("unet/diffusion_pytorch_model.safetensors", ("checkpoint weights", "unet/diffusion_pytorch_model.safetensors")),
])
def test_a_package_holding_anything_else_is_not_replaced(tiny_checkpoint, tiny_package, tmp_path, capsys, extra,
                                                         fragments):
    package = Path(shutil.copytree(tiny_package("sd15"), tmp_path / "pkg"))
    (package / extra).parent.mkdir(exist_ok=True)
    (package / extra).write_bytes(b"the user's")
    before = snapshot(package)
    export_refused(capsys, str(tiny_checkpoint("sd15")), str(package), "--components", "text_encoder", "--overwrite",
                   fragments=("`output`", str(package), *fragments))
    assert snapshot(package) == before and sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_export_to_the_current_folder_leaves_nothing_beside_it(tiny_checkpoint, tiny_package, tmp_path):
    """`cd pkg && diffrt export CK . --overwrite`: the package is replaced in place, no `..old-*` / `..tmp-*`; the
    log shows each component's progress and time."""
    package = Path(shutil.copytree(tiny_package("sd15"), tmp_path / "pkg"))
    result = run_cli("export", tiny_checkpoint("sd15"), ".", "--components", "text_encoder,vae_decoder",
                     "--overwrite", cwd=package)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
    assert not [p.name for p in package.iterdir() if p.name.startswith(".")]
    assert list(json.loads((package / "diffrt.json").read_text())["components"]) == ["text_encoder", "vae_decoder"]
    for number, name in enumerate(["text_encoder", "vae_decoder"], 1):
        assert f"exporting {name} ({number}/2)" in result.stderr
        assert f"{name}: fp32 in " in result.stderr  # the time each component took


# --- checkpoints diffrt cannot export --------------------------------------------------------------------------------


def _pixart_like(tiny_checkpoint, target: Path) -> Path:
    """The tiny SD3 checkpoint relabelled as a PixArt-Sigma pipeline: a transformer class diffrt does not export,
    beside text encoders and a VAE it does (the shape of a package that would look complete and fail at load)."""
    folder = Path(shutil.copytree(tiny_checkpoint("sd3"), target))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="PixArtSigmaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_an_unsupported_transformer_checkpoint_is_refused_by_name_before_any_weight_is_read(tiny_checkpoint,
                                                                                          tmp_path, capsys):
    """Every weight file of the copy is garbage: the refusal names the pipeline and its component, not a damaged
    file, so nothing was read beyond model_index.json."""
    pixart = _pixart_like(tiny_checkpoint, tmp_path / "pixart")
    for weights in pixart.rglob("*.safetensors"):
        weights.write_bytes(b"garbage")
    export_refused(capsys, str(pixart), str(tmp_path / "out"),
                   fragments=("PixArtSigmaPipeline", "`transformer` (PixArtTransformer2DModel)", "--components",
                              "text_encoder, text_encoder_2, text_encoder_3, vae_encoder, vae_decoder"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pixart"]


def test_an_unsupported_hub_repo_is_refused_before_its_weights_are_downloaded(tiny_checkpoint, tmp_path):
    """Offline, the Hub cache (models--owner--name/refs/main -> snapshots/<commit>/) holds only the repo's
    model_index.json: the refusal needs nothing else."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "home" / "hub" / "models--someone--pixart"
    (repo / "snapshots" / commit).mkdir(parents=True)
    pixart = _pixart_like(tiny_checkpoint, tmp_path / "pixart")
    shutil.copyfile(pixart / "model_index.json", repo / "snapshots" / commit / "model_index.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = run_cli("export", "someone/pixart", tmp_path / "out", HF_HOME=str(tmp_path / "home"),
                     HF_HUB_OFFLINE="1", HF_HUB_CACHE=None)
    assert result.returncode == 2
    one_line_error(result.stderr, "export", "someone/pixart", "PixArtSigmaPipeline", "`transformer`")
    assert not (tmp_path / "out").exists()


def test_components_still_export_a_subset_of_an_unsupported_checkpoint_on_purpose(tiny_checkpoint, tmp_path,
                                                                                   caplog):
    output = tmp_path / "out"
    pixart = _pixart_like(tiny_checkpoint, tmp_path / "pixart")
    with caplog.at_level(logging.WARNING, logger="diffrt.export.plan"):
        export_pipeline(pixart, output, components=["text_encoder", "vae_decoder"])
    assert "PixArtSigmaPipeline, which diffrt has no pipeline for" in caplog.text
    manifest = json.loads((output / "diffrt.json").read_text())
    assert manifest["pipeline"] == "PixArtSigmaPipeline"
    assert list(manifest["components"]) == ["text_encoder", "vae_decoder"]


@pytest.mark.parametrize(("edit", "named"), [
    ({"_class_name": "StableDiffusionControlNetPipeline", "controlnet": ["diffusers", "MultiControlNetModel"]},
     ("`controlnet` (MultiControlNetModel)",)),
    ({"_class_name": "StableDiffusionAdapterPipeline", "adapter": ["diffusers", "T2IAdapter"]},
     ("the pipeline class StableDiffusionAdapterPipeline", "`adapter` (T2IAdapter)")),
    ({"scheduler": ["diffusers", "ScoreSdeVeScheduler"]}, ("`scheduler` (ScoreSdeVeScheduler)",)),
    ({"unet": ["diffusers", "UNet2DModel"]}, ("`unet` (UNet2DModel)",)),
])
def test_unexportable_classes_and_components_are_named(checkpoint_copy, tmp_path, capsys, edit, named):
    index = json.loads((checkpoint_copy / "model_index.json").read_text())
    (checkpoint_copy / "model_index.json").write_text(json.dumps({**index, **edit}))
    for added in set(edit) - set(index):
        shutil.copytree(checkpoint_copy / "unet", checkpoint_copy / added)
    export_refused(capsys, str(checkpoint_copy), str(tmp_path / "out"),
                   fragments=("diffrt cannot export", *named))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# --- temp folders of killed runs -------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def test_a_killed_export_leaves_a_temp_folder_the_next_export_removes(tiny_checkpoint, tmp_path):
    output = tmp_path / "pkg"
    command = [sys.executable, "-m", "diffrt.cli", "export", str(tiny_checkpoint("sd15")), str(output)]
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(".pkg.tmp-*/text_encoder/model.onnx")):  # mid-way: a component is written
            assert process.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    [stale] = _leftovers(tmp_path)
    assert stale.name.startswith(f".pkg.tmp-{process.pid}@{host_name()}-") and not output.exists()
    result = run_cli("export", tiny_checkpoint("sd15"), output, "--components", "text_encoder")
    assert result.returncode == 0, result.stderr
    assert f"removed {stale}, left by a diffrt run (pid {process.pid})" in result.stderr
    assert _leftovers(tmp_path) == [] and (output / "diffrt.json").is_file()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_folders_of_dead_processes_go_and_the_rest_stay(tmp_path, caplog):
    target = tmp_path / "pkg"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # never waited for until the end: a zombie
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        host = host_name()
        dead = tmp_path / f".pkg.tmp-{_dead_pid()}@{host}-abcd1234"
        unreaped = tmp_path / f".pkg.tmp-{zombie.pid}@{host}-abcd1235"
        alive = tmp_path / f".pkg.tmp-{sleeper.pid}@{host}-abcd1236"
        reused = tmp_path / f".pkg.tmp-{sleeper.pid}@{host}-abcd1237"  # older than the live process with its pid
        remote = tmp_path / ".pkg.tmp-1@elsewhere.example-abcd1238"
        legacy = tmp_path / ".pkg.tmp-abcd1239"  # written before temp folders recorded their process
        other = tmp_path / f".pkg2.tmp-{_dead_pid()}@{host}-abcd1240"  # beside another package
        for folder in (dead, unreaped, alive, reused, remote, legacy, other):
            (folder / "unet").mkdir(parents=True)
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        with caplog.at_level(logging.INFO, logger="diffrt.package.leftovers"):
            removed = remove_stale_temp(target)
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()
    assert sorted(removed) == sorted([dead, unreaped, reused])
    assert _leftovers(tmp_path) == sorted([alive, remote, legacy, other])
    assert f"{remote} belongs to a diffrt run on host elsewhere.example" in caplog.text
    assert f"{legacy} may be left by an interrupted diffrt run" in caplog.text


def test_a_package_a_killed_run_was_replacing_is_restored_not_deleted(tiny_package, tiny_checkpoint, tmp_path,
                                                                       capsys):
    """Killed between renaming the old package aside and the new one in: the next export puts the old one back."""
    aside = tmp_path / f".pkg.old-{_dead_pid()}@{host_name()}-abcd1234"
    aside.mkdir()
    shutil.copytree(tiny_package("sd15"), aside / "pkg")
    before = snapshot(aside / "pkg")
    export_refused(capsys, str(tiny_checkpoint("sd15")), str(tmp_path / "pkg"),
                   fragments=("`output`", "does not exist yet"))  # the restored package is not replaced unasked
    assert snapshot(tmp_path / "pkg") == before and _leftovers(tmp_path) == []


# --- disk errors: named, nothing left behind ----------------------------------------------------------------------


def test_a_file_where_the_output_folder_should_go_is_named_before_work(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    export_refused(capsys, str(tiny_checkpoint("sd15")), str(blocker / "sub" / "pkg"),
                   fragments=("`output`", "cannot be created", f"{str(blocker)!r} is a file"))
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_write_the_file_system_refuses_is_named_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """A real write error from the kernel mid-export: a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the
    first ONNX file's write fail with EFBIG, as a full disk fails with ENOSPC (a tmpfs needs root to mount)."""
    output = tmp_path / "pkg"
    script = (
        "import resource, signal, sys\n"
        "from diffrt.cli import main\n"
        "import diffrt.export.exporter, onnx, torch.onnx  # imported before the limit: their caches may write\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))\n"
        f"sys.exit(main(['export', {str(tiny_checkpoint('sd15'))!r}, {str(output)!r}, '--components', "
        "'text_encoder', '-q']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(),
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr  # (transformers prints its own weight-loading bar before the error)
    one_line_error(result.stderr.splitlines()[-1], "export", f"exporting to {output} failed",
                   "nothing was left behind", "File too large")
    assert list(tmp_path.iterdir()) == []


def test_a_package_larger_than_the_free_space_is_refused_before_loading(checkpoint_copy, tmp_path, capsys):
    """The VAE's weight file claims a 1 TiB tensor (a sparse file, so the disk is not really used): the export
    stops before loading any component, naming the output and the space it needs."""
    huge = checkpoint_copy / "vae" / "diffusion_pytorch_model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}).encode()
    with open(huge, "wb") as stream:
        stream.write(len(header).to_bytes(8, "little") + header)
        stream.truncate(8 + len(header) + (1 << 40))
    if shutil.disk_usage(tmp_path).free > 1 << 40:
        pytest.skip("this disk has more than 1 TiB free")
    started = time.monotonic()
    export_refused(capsys, checkpoint_copy, tmp_path / "out", code=1,
                   fragments=(f"not enough disk space for {tmp_path / 'out'}", "need about 1099.5"))
    assert time.monotonic() - started < 30 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# --- damaged source weights: named before the first component is exported ----------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-100])


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _huge_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes((1 << 62).to_bytes(8, "little") + data[8:])


def _wrong_size(path: Path) -> None:
    """A header whose first tensor claims one byte more (the offsets no longer match dtype x shape)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 1
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


@pytest.mark.parametrize(("damage", "why"), [
    (_truncate, "truncated: the header describes"),
    (_garbage_header, "its header is not JSON"),
    (_huge_length, "its header length field"),
    (_wrong_size, "needs"),
    (lambda path: path.write_bytes(b""), "its header length field (missing)"),
])
def test_a_damaged_weight_file_is_named_before_any_component_is_exported(checkpoint_copy, tmp_path, caplog, damage,
                                                                         why):
    """The UNet's file is damaged; the text encoder, exported before the UNet, is never started."""
    damage(checkpoint_copy / UNET_WEIGHTS)
    with caplog.at_level(logging.INFO), pytest.raises(ExportError, match="nothing was exported") as error:
        export_pipeline(checkpoint_copy, tmp_path / "out")
    assert str(checkpoint_copy / UNET_WEIGHTS) in str(error.value) and why in str(error.value)
    assert "exporting text_encoder" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_refusals_are_config_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="PixArtSigmaPipeline"):
        export_pipeline(_pixart_like(tiny_checkpoint, tmp_path / "pixart"), tmp_path / "out")
