"""A separate virtual environment holding the real Optimum (`optimum-onnx`), built once and cached across sessions.

Optimum pins its own transformers (< 4.58) and runs with diffusers releases older than the main test environment's,
so it cannot live in that environment. The venv sees the test environment's packages through a `.pth` file, after
its own: the CPU torch already installed there satisfies the torch pin (nothing is downloaded, so no CUDA build can
be pulled), and only Optimum and its pins are installed on top, from PyPI. A `.pth` file rather than
`--system-site-packages`, because the test environment is itself a venv in CI (`.ci/run`), and
`--system-site-packages` would expose the base interpreter's packages, not its. The folder name is keyed by the
requirements and the test environment, so changing either builds a new one; a `diffrt-complete` marker is written
last, so a build killed half-way is rebuilt instead of used.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

# optimum-onnx 0.1.0 needs `optimum` 2.x and transformers < 4.58; diffusers 0.36 is the release its ORT pipelines
# were written against. torch is pinned to the main environment's CPU build (already installed: nothing downloaded).
REQUIREMENTS = (
    "torch==2.13.0",
    "optimum-onnx[onnxruntime]==0.1.0",
    "optimum==2.1.0",
    "transformers==4.57.6",
    "diffusers==0.36.0",
)
MARKER = "diffrt-complete"
BUILD_TIMEOUT_S = 1200


def venv_dir() -> Path:
    """DIFFRT_OPTIMUM_VENV, or a folder under ~/.cache/diffrt-tests keyed by the requirements."""
    if os.environ.get("DIFFRT_OPTIMUM_VENV"):
        return Path(os.environ["DIFFRT_OPTIMUM_VENV"]).expanduser()
    key = hashlib.sha256(" ".join(REQUIREMENTS + tuple(_parent_paths())).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "diffrt-tests" / f"optimum-venv-{key}"


def _parent_paths() -> list[str]:
    """The site-packages folders of the environment running the tests."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def venv_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def build_venv(folder: Path) -> Path:
    """Build the venv (or reuse a complete one); returns its python. Raises CalledProcessError when pip fails."""
    marker = folder / MARKER
    if marker.is_file() and marker.read_text().strip() == " ".join(REQUIREMENTS):
        return venv_python(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import version

    if not version("torch").endswith("+cpu"):  # the pin must be met by this environment's torch, not a download
        raise RuntimeError(f"the test environment's torch is {version('torch')}, not the CPU build")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    site = subprocess.run([str(venv_python(folder)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "diffrt-test-environment.pth").write_text("\n".join(_parent_paths()) + "\n")
    subprocess.run([str(venv_python(folder)), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True,
                   timeout=BUILD_TIMEOUT_S)
    marker.write_text(" ".join(REQUIREMENTS) + "\n")
    return venv_python(folder)


def run_in_venv(python: Path, *args: object, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python args...` with an environment that cannot reach the network or this checkout's diffrt."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    result = subprocess.run([str(python), *argv], capture_output=True, text=True, env=env,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    """The python of the Optimum venv, built on first use (a few minutes, from PyPI; cached afterwards)."""
    try:
        return build_venv(venv_dir())
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError) as error:
        pytest.fail(f"could not build the Optimum test venv at {venv_dir()} ({' '.join(REQUIREMENTS)}): {error}")
