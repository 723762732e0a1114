"""Resolve a model package argument: a local folder, or a Hugging Face Hub repo id fetched into the HF cache.

Environment variables are read at call time (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE), so a process that sets them
after importing huggingface_hub still gets the cache and offline mode it asked for.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, TypeVar

from diffrt.errors import DiffrtError, InputError, PackageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Only what a package needs: no PyTorch weights or safetensors from mixed repos.
ALLOW_PATTERNS = ["*.json", "*.txt", "*.onnx", "*.onnx_data", "*.plan"]
_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path | None:
    """The HF cache folder the environment asks for now, or None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE), read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.exists(name)


def resolve_package(
    name_or_path: str | os.PathLike[str],
    revision: str | None = None,
    token: str | bool | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    subfolder: str | None = None,
) -> Path:
    """The local folder of a package: `name_or_path` itself if it is a folder, else a Hub snapshot.

    Hub downloads keep only package files (ONNX, external data, JSON, text, TensorRT plans), and only those under
    `subfolder` when one is given (a repo holding the package in a folder, as Diffusers' `subfolder`). With
    HF_HUB_OFFLINE=1 (or `local_files_only=True`) only the local cache is used; `cache_dir` replaces the HF cache
    folder, as in Diffusers. Raises PackageError when neither exists.
    """
    from diffrt.runtime.builtin import resolve_builtin

    sub = _subfolder(subfolder)
    name = os.fspath(resolve_builtin(os.fspath(name_or_path)))
    if os.path.isdir(name):
        return _in_subfolder(Path(name), sub, name)
    if _looks_like_path(name) or not _valid_repo_id(name):
        raise PackageError(f"`name_or_path` must be a model package folder or a Hub repo id; no folder {name!r}")
    offline = hub_offline() if local_files_only is None else bool(local_files_only)
    patterns = [f"{sub}/{pattern}" for pattern in ALLOW_PATTERNS] if sub else ALLOW_PATTERNS
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    folder = hub_snapshot(name, revision=revision, token=token, allow_patterns=patterns, cache_dir=cache,
                          local_files_only=offline, purpose="the package files", error=PackageError)
    logger.info("resolved %s (revision %s) to %s", name, revision or "main", folder)
    return _in_subfolder(folder, sub, name)


def _subfolder(subfolder: str | None) -> str | None:
    """`subfolder` as a repo-relative POSIX path; absolute paths and `..` are refused (it names a folder inside)."""
    if subfolder is None or subfolder in ("", "."):
        return None
    if not isinstance(subfolder, str):
        raise InputError(f"`subfolder` must be a folder name inside the package repo; got {subfolder!r}")
    parts = subfolder.replace("\\", "/").strip("/").split("/")
    if subfolder.startswith(("/", "\\")) or ".." in parts:
        raise InputError(f"`subfolder` must be a relative folder inside the package repo; got {subfolder!r}")
    return "/".join(part for part in parts if part not in ("", "."))


def _in_subfolder(folder: Path, sub: str | None, name: str) -> Path:
    if sub is None:
        return folder
    if not (folder / sub).is_dir():
        raise PackageError(f"`subfolder` {sub!r} does not exist in {name!r}")
    return folder / sub


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_snapshot(repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                 allow_patterns: list[str], ignore_patterns: list[str] | None = None,
                 cache_dir: Path | None = None, local_files_only: bool = False, purpose: str = "files",
                 error: type[DiffrtError] = PackageError) -> Path:
    """`snapshot_download` of the matching files (from the cache when offline), errors translated by `hub_call`."""
    from huggingface_hub import snapshot_download

    folder = hub_call(lambda: snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                                local_files_only=local_files_only, allow_patterns=allow_patterns,
                                                ignore_patterns=ignore_patterns),
                      repo_id, revision, purpose, error, cache_dir=cache_dir, offline=local_files_only or None)
    return Path(folder)


def hub_call(call: Callable[[], T], repo_id: str, revision: str | None, purpose: str,
             error: type[DiffrtError] = PackageError, *, cache_dir: Path | None = None,
             offline: bool | None = None) -> T:
    """Run a huggingface_hub call; its errors become `error` with a message that says what to do (the one
    translation of Hub errors: the runtime fetching packages and the exporter fetching checkpoints both use it)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    incomplete = _incomplete_snapshot_error()
    where = f"the Hub cache {cache_dir}" if cache_dir is not None else f"the Hub cache ({constants.HF_HUB_CACHE})"
    offline = hub_offline() if offline is None else offline
    try:
        return call()
    except GatedRepoError as problem:  # before RepositoryNotFoundError, its base class
        raise error(f"Hub repo {repo_id!r} is gated: accept its terms on huggingface.co, then log in "
                    "(`hf auth login`) or pass `token`") from problem
    except RepositoryNotFoundError as problem:
        raise error(f"Hub repo {repo_id!r} not found, or not accessible (private repos need a login or "
                    "`token`)") from problem
    except RevisionNotFoundError as problem:
        raise error(f"Hub repo {repo_id!r} has no revision {revision!r}") from problem
    except LocalEntryNotFoundError as problem:  # before EntryNotFoundError, its base class
        mode = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise error(f"cannot get {purpose} of Hub repo {repo_id!r} (revision {revision or 'main'}): not in {where}, "
                    f"and {mode}") from problem
    except EntryNotFoundError as problem:
        raise error(f"Hub repo {repo_id!r} has no {purpose}") from problem
    except incomplete as problem:
        raise error(f"the cached snapshot of {repo_id!r} in {where} is incomplete: {problem}") from problem
    except HfHubHTTPError as problem:
        raise error(f"Hub request for {repo_id!r} failed: {problem}") from problem


def _incomplete_snapshot_error() -> type[Exception]:
    """huggingface_hub's IncompleteSnapshotError (newer releases); a type nothing raises where it is absent."""
    from huggingface_hub import errors

    return getattr(errors, "IncompleteSnapshotError", _NeverRaised)


class _NeverRaised(Exception):
    pass
