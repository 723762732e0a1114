"""Running `diffrt` as a user's shell does: `python -m diffrt.cli ...` in a fresh interpreter, this checkout first
on the path (an installed diffrt elsewhere must not answer instead)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str | None) -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH; `extra` values of None are removed."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    return {name: value for name, value in env.items() if value is not None}


def run_cli(*args: str | bytes | Path, cwd: Path | None = None, timeout: float = 300,
            **env: str | None) -> subprocess.CompletedProcess:
    """The real entry point; `args` may be bytes (argv that is not UTF-8). stdout / stderr are text (stderr is
    written with backslash escapes, so it always decodes)."""
    argv = [a if isinstance(a, bytes) else os.fspath(a) for a in args]
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *argv], capture_output=True, text=True,
                          errors="replace", env=cli_env(**env), cwd=cwd, timeout=timeout)


def one_line_error(stderr: str, command: str, *fragments: str) -> str:
    """The error line of a failed run: exactly one stderr line, `diffrt COMMAND: error: ...`, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"diffrt {command}: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
