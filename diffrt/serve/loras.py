"""The LoRA files a server applies by name, as AUTOMATIC1111's Lora extension finds and names them.

`--lora-dir` folders are A1111's `models/Lora`: every `*.safetensors` below them (recursively) is a LoRA named by
its file stem; its `alias` is the metadata's `ss_output_name` (else the name), and a request may use either. When two
files share a stem, the one found last wins, as in A1111. Its short hash (`Lora hashes` in the infotext) is A1111's:
the metadata's `sshs_model_hash`, else the kohya / additional-networks hash ("AutoV3": sha256 of the tensor data after
the safetensors header), first 12 hex digits (extensions-builtin/Lora/network.py, modules/hashes.py).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from diffrt.serve.jobs import LoraUse, ServeError

logger = logging.getLogger(__name__)
SUFFIX = ".safetensors"
SHORT_HASH_LENGTH = 12  # A1111's Lora shorthash
SUGGESTIONS = 5  # names listed in an unknown-name error
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_BLOCK = 1024 * 1024


@dataclass
class LoraEntry:
    """One LoRA file: A1111's `name` (file stem), `alias`, `path` and safetensors `metadata`."""

    name: str
    alias: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    def as_a1111(self) -> dict[str, Any]:
        """The entry as A1111's `GET /sdapi/v1/loras` lists it."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


class LoraLibrary:
    """The LoRAs of `folders`, found at start and again on `refresh()`; thread-safe."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = [Path(folder) for folder in folders]
        self._lock = threading.Lock()
        self._entries: dict[str, LoraEntry] = {}
        self._aliases: dict[str, LoraEntry] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> short hash
        self.refresh()

    def refresh(self) -> None:
        """Search the folders again (A1111's `POST /sdapi/v1/refresh-loras`)."""
        entries: dict[str, LoraEntry] = {}
        for folder in self.folders:
            for path in sorted(folder.rglob(f"*{SUFFIX}")):
                if path.is_file():
                    entries[path.stem] = _entry(path)
        aliases = {entry.alias: entry for entry in entries.values()}
        aliases.update(entries)  # a file's own name wins over another file's alias
        with self._lock:
            self._entries, self._aliases = entries, aliases
        logger.info("found %d LoRA files in %s", len(entries), ", ".join(map(str, self.folders)))

    def entries(self) -> list[LoraEntry]:
        with self._lock:
            return list(self._entries.values())

    def find(self, name: str, param: str) -> LoraEntry:
        """The LoRA called `name` (its file stem or alias); ServeError 400 naming `param` and a few known names."""
        with self._lock:
            entry = self._aliases.get(name)
            names = sorted(self._entries)
        if entry is not None:
            return entry
        close = difflib.get_close_matches(name, names, n=SUGGESTIONS, cutoff=0.5)
        shown = (close + [n for n in names if n not in close])[:SUGGESTIONS]
        more = f" (and {len(names) - len(shown)} more: GET /sdapi/v1/loras)" if len(names) > len(shown) else ""
        known = f"available: {', '.join(shown)}{more}" if names else "the LoRA folders hold no .safetensors files"
        raise ServeError(400, f"`{param}` names the LoRA {name!r}, which is not in --lora-dir; {known}",
                         param=param, code="lora_not_found")

    def short_hash(self, path: Path) -> str:
        """A1111's short hash of a LoRA file, computed once per file version (size and modification time)."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            length, metadata = _header(path)
            known = str(metadata.get("sshs_model_hash") or _data_sha256(path, 8 + length))[:SHORT_HASH_LENGTH]
            with self._lock:
                self._hashes[key] = known
        return known


@dataclass
class LoraRequest:
    """What a request's LoRAs come to: the prompt for the text encoder (tags removed), the LoRAs to apply (one per
    file, weights of repeated ones added: their updates add up, as A1111 applies each tag; LoRAs whose weights are
    all 0 left out, they change nothing), and each name as mentioned with its file (for `Lora hashes`)."""

    prompt: str
    loras: tuple[LoraUse, ...] = ()
    mentioned: list[tuple[str, Path]] = field(default_factory=list)


def resolve_loras(library: LoraLibrary | None, prompt: str, explicit: Sequence[Any] | None,
                  explicit_param: str = "loras") -> LoraRequest:
    """The LoRAs of a request: A1111's `<lora:NAME:TE[:UNET]>` tags in `prompt` (the negative prompt is left as
    it is, as in A1111), then `explicit` (objects with `name` and `weight`). ServeError 400 naming the field for a
    malformed tag, an unknown name, a weight that is not finite, or any LoRA on a server without `--lora-dir`."""
    from diffrt.errors import InputError
    from diffrt.runtime.extra_networks import extract_loras

    try:
        clean, tags = extract_loras(prompt, "prompt")
    except InputError as error:
        raise ServeError(400, str(error), param="prompt", code="invalid_value") from None
    wanted = [(tag.name, tag.text_encoder_scale, tag.unet_scale, "prompt") for tag in tags]
    for index, spec in enumerate(explicit or []):
        weight = float(spec.weight)
        if not math.isfinite(weight):
            raise ServeError(400, f"`{explicit_param}[{index}].weight` must be a finite number; got {spec.weight}",
                             param=explicit_param, code="invalid_value")
        wanted.append((spec.name, weight, weight, explicit_param))
    if not wanted:
        return LoraRequest(prompt)
    if library is None:
        param = wanted[0][3]
        raise ServeError(400, f"`{param}` asks for the LoRA {wanted[0][0]!r}, but this server applies no LoRAs: start "
                         "it with --lora-dir FOLDER (A1111's models/Lora)", param=param, code="lora_not_enabled")
    applied: dict[Path, list[Any]] = {}
    mentioned: list[tuple[str, Path]] = []
    for name, text_encoder, unet, param in wanted:
        entry = library.find(name, param)
        mentioned.append((name, entry.path))
        if entry.path in applied:
            applied[entry.path][2] += text_encoder
            applied[entry.path][3] += unet
        else:
            applied[entry.path] = [entry.name, str(entry.path), text_encoder, unet, param]
    uses = sorted((LoraUse(*values) for values in applied.values() if values[2] or values[3]),
                  key=lambda use: use.path)
    return LoraRequest(clean, tuple(uses), mentioned)


def lora_hashes(library: LoraLibrary | None, mentioned: Sequence[tuple[str, Path]]) -> dict[str, str]:
    """A1111's infotext field `Lora hashes` ("name: hash, ...", by the names the request used, `:` and `,`
    removed), or {} without LoRAs. Hashing reads each file once per version: call it off the event loop."""
    if library is None or not mentioned:
        return {}
    parts: dict[str, str] = {}
    for name, path in mentioned:
        parts.setdefault(name.replace(":", "").replace(",", ""), library.short_hash(path))
    return {"Lora hashes": ", ".join(f"{name}: {digest}" for name, digest in parts.items())}


def _entry(path: Path) -> LoraEntry:
    try:
        metadata: dict[str, Any] = _header(path)[1]
    except (OSError, ValueError) as error:  # listed anyway: applying it reports the problem to the request
        logger.warning("cannot read the metadata of %s: %s", path, error)
        metadata = {}
    return LoraEntry(path.stem, str(metadata.get("ss_output_name") or path.stem), path.absolute(), metadata)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, `__metadata__`) of a safetensors file, reading only its header."""
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= length <= min(_MAX_HEADER, os.fstat(stream.fileno()).st_size - 8):
            raise ValueError(f"{path} is not a safetensors file (damaged or truncated header)")
        header = json.loads(stream.read(length))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return length, {key: _value(value) for key, value in metadata.items()} if isinstance(metadata, dict) else {}


def _value(text: Any) -> Any:
    """A metadata value as A1111 lists it: JSON objects (kohya's `ss_tag_frequency`, ...) parsed, the rest as is."""
    if isinstance(text, str) and text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def _data_sha256(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        stream.seek(offset)
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()
