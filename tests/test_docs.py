"""The README's and docs/'s examples run: every ```bash and ```python block, unless an HTML comment right above it
says why not.

Markers (the last line before the fence):
- `<!-- doctest: skip (why) -->`: not run (a download, a GPU, a long job); the reason is the skip message.
- `<!-- doctest: slow (why) -->`: run, marked slow.
- `<!-- doctest: packages NAME=KIND ... (why) -->`: run with NAME in the working folder linked to the tiny
  random-weight package KIND (`tiny_package`), standing in for a real model of that family.

Each example runs in its own empty folder (with `tests/` linked in, for paths into this repository) as a user's shell
would: `diffrt` is this checkout's command. `pip install` lines print instead of installing (the tests run in the
installed environment already) and `python -m pytest` does not run the suite inside itself. Every other fenced
block must be tagged `text` or `json` (JSON blocks must parse), so no shell example can hide untagged.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runner import REPO, cli_env

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = ("bash", "python")
LANGUAGES = (*RUNNABLE, "text", "json")
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*doctest:\s*(skip|slow|packages)\s*(.*?)\s*-->$")
PRELUDE = """set -euo pipefail
pip() { echo "doc test: not running: pip $*"; }
python() {
  if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pytest" ]; then echo "doc test: not running the suite inside itself";
  else command python "$@"; fi
}
"""


@dataclass(frozen=True)
class Example:
    doc: Path
    line: int  # of the opening fence
    language: str
    code: str
    marker: str | None = None  # skip | slow | packages
    argument: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def read_examples(doc: Path) -> list[Example]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    examples, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i].strip())
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        indent = len(lines[i]) - len(lines[i].lstrip())
        code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        marker = MARKER.match(lines[i - 1].strip()) if i > 0 else None
        examples.append(Example(doc, i + 1, fence.group(1), code, *(marker.groups() if marker else ())))
        i = end + 1
    return examples


ALL = [example for doc in DOCS for example in read_examples(doc)]
RUN = [example for example in ALL if example.language in RUNNABLE]


def test_every_fenced_block_says_what_it_is():
    untagged = [f"{e.id} ({e.language or 'no language'})" for e in ALL if e.language not in LANGUAGES]
    assert not untagged, f"tag these blocks {', '.join(LANGUAGES)}: {untagged}"
    assert len(RUN) >= 10  # the parser found the examples


@pytest.mark.parametrize("example", [e for e in ALL if e.language == "json"], ids=lambda e: e.id)
def test_json_examples_parse(example: Example):
    json.loads(example.code)


def _params() -> list:
    params = []
    for example in RUN:
        marks = []
        if example.marker == "skip":
            marks.append(pytest.mark.skip(reason=f"{example.id}: {example.argument}"))
        if example.marker == "slow":
            marks.append(pytest.mark.slow)
        params.append(pytest.param(example, marks=marks, id=example.id))
    return params


@pytest.mark.parametrize("example", _params())
def test_example_runs(example: Example, tmp_path: Path, request: pytest.FixtureRequest):
    work = tmp_path / "work"
    work.mkdir()
    (work / "tests").symlink_to(REPO / "tests")
    if example.marker == "packages":
        tiny_package = request.getfixturevalue("tiny_package")
        for name, kind in re.findall(r"([\w.-]+)=(\w+)", example.argument.split("(")[0]):
            (work / name).symlink_to(tiny_package(kind))
    result = _run(example, work, _commands(tmp_path / "bin"))
    assert result.returncode == 0, f"{example.id}\n{example.code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def _commands(folder: Path) -> Path:
    """`diffrt`, `python` and `python3` as this checkout and this interpreter."""
    folder.mkdir()
    for name, target in (("diffrt", f'"{sys.executable}" -m diffrt.cli'), ("python", f'"{sys.executable}"'),
                         ("python3", f'"{sys.executable}"')):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
        script.chmod(0o755)
    return folder


def _run(example: Example, work: Path, bin_folder: Path) -> subprocess.CompletedProcess:
    env = cli_env()
    env["PATH"] = f"{bin_folder}:{env.get('PATH', '')}"
    if example.language == "python":
        (work / "example.py").write_text(example.code, encoding="utf-8")
        command = [sys.executable, "example.py"]
    else:
        command = ["bash", "-c", PRELUDE + example.code]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
