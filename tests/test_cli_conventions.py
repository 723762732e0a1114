"""Command-line conventions, as real processes: --version, -q / -v on either side of the subcommand, --threads,
`diffrt info` on built-in names and Hub ids, and a progress line per exported component."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_runner import REPO, run_cli
from hub_cache import add_snapshot

from diffrt import __version__

DIGITS = REPO / "diffrt" / "builtin_packages" / "digits"


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"diffrt {__version__}"


@pytest.mark.parametrize("argv", [["-v", "info", "digits"], ["info", "digits", "-v"], ["info", "-v", "digits"]])
def test_verbose_works_before_and_after_the_subcommand(argv):
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert "opened ModelPackage(" in result.stderr  # a debug line


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_works_before_and_after_the_subcommand(tmp_path: Path, where: str):
    args = ["generate", "digits", "a seven", "--steps", "2", "-o", "x.png"]
    result = run_cli(*(["-q", *args] if where == "before" else [*args, "-q"]), cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_threads_reaches_every_engine():
    from diffrt.cli import build_parser
    from diffrt.cli.generate import _check_arguments, _load

    argv = ["generate", "digits", "a seven", "--threads", "1"]
    args = build_parser(argv).parse_args(argv)
    pipe = _load(args, _check_arguments(args), from_png=False)
    for name in ("text_encoder", "unet", "vae_decoder"):
        session = pipe.engine(name).session
        assert session.get_session_options().intra_op_num_threads == 1, name


def test_info_takes_a_builtin_name():
    result = run_cli("info", "digits")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pipeline   StableDiffusionPipeline\n")
    assert "  unet: unet/model.onnx, fp32, max abs diff" in result.stdout


def test_info_takes_a_hub_repo_id_from_the_cache_offline(tmp_path: Path):
    """The Hub cache layout (refs/main -> snapshots/<commit>/, symlinks into blobs/) with the digits package in it;
    offline, `diffrt info owner/name` reads its manifest from there."""
    add_snapshot(tmp_path / "home" / "hub", "someone/digits", DIGITS)
    result = run_cli("info", "someone/digits", HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", HF_HUB_CACHE=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout == run_cli("info", "digits").stdout


@pytest.mark.slow
def test_export_prints_a_line_per_component_at_default_verbosity(tiny_checkpoint, tmp_path: Path):
    result = run_cli("export", tiny_checkpoint("sd15"), tmp_path / "out", timeout=900)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert any(line.startswith(f"{name}: fp32 in ") for line in lines), result.stderr
    quiet = run_cli("export", tiny_checkpoint("sd15"), tmp_path / "quiet", "--components", "text_encoder", "-q")
    assert quiet.returncode == 0 and not any(line.startswith("text_encoder:") for line in quiet.stderr.splitlines())
