"""The server's output folder: images answered as `url` are written here (atomically) and served from here only.
Names are 128 random bits, so a URL is unguessable and no request can name a file outside the folder."""
from __future__ import annotations

import re
import secrets
import tempfile
from pathlib import Path

from diffrt.package.files import write_bytes
from diffrt.serve.jobs import ServeError

NAME = re.compile(r"[0-9a-f]{32}\.png")


class OutputFolder:
    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else Path(tempfile.mkdtemp(prefix="diffrt-serve-"))
        self.path.mkdir(parents=True, exist_ok=True)

    def save(self, png: bytes) -> str:
        name = f"{secrets.token_hex(16)}.png"
        write_bytes(self.path / name, png)
        return name

    def find(self, name: str) -> Path:
        path = self.path / name
        if not NAME.fullmatch(name) or not path.is_file():
            raise ServeError(404, f"no image {name!r} here", param="name", code="not_found", kind="not_found_error")
        return path
