"""The server's output folder: images answered as `url` are written here (atomically) and served from here only.
Names are 128 random bits, so a URL is unguessable and no request can name a file outside the folder."""
from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from pathlib import Path

from diffrt.package.files import write_bytes
from diffrt.serve.jobs import ServeError

NAME = re.compile(r"[0-9a-f]{32}\.png")


class OutputFolder:
    """`path` given: the user's folder, kept. None: a private temporary folder, made at the first `url` image and
    removed with its images when the server stops (its URLs die with the server anyway)."""

    def __init__(self, path: Path | None) -> None:
        self._given = Path(path) if path is not None else None
        self._temporary: Path | None = None
        if self._given is not None:
            self._given.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        if self._given is not None:
            return self._given
        if self._temporary is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="diffrt-serve-"))
        return self._temporary

    def save(self, png: bytes) -> str:
        name = f"{secrets.token_hex(16)}.png"
        write_bytes(self.path / name, png)
        return name

    def find(self, name: str) -> Path:
        path = self.path / name
        if not NAME.fullmatch(name) or not path.is_file():
            raise ServeError(404, f"no image {name!r} here", param="name", code="not_found", kind="not_found_error")
        return path

    def close(self) -> None:
        """Remove the private temporary folder (never a folder the user named)."""
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
            self._temporary = None
