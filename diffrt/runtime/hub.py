"""Resolve a model package argument: a local folder, or a Hugging Face Hub repo id fetched into the HF cache.

Environment variables are read at call time (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE), so a process that sets them
after importing huggingface_hub still gets the cache and offline mode it asked for.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from diffrt.errors import PackageError

logger = logging.getLogger(__name__)

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
    cache_dir: str | Path | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The local folder of a package: `name_or_path` itself if it is a folder, else a Hub snapshot.

    Hub downloads keep only package files (ONNX, external data, JSON, text, TensorRT plans). With HF_HUB_OFFLINE=1
    (or `local_files_only=True`) only the local cache is used. Raises PackageError when neither exists.
    """
    from diffrt.runtime.builtin import resolve_builtin

    name = os.fspath(resolve_builtin(os.fspath(name_or_path)))
    if os.path.isdir(name):
        return Path(name)
    if _looks_like_path(name) or not _valid_repo_id(name):
        raise PackageError(f"`name_or_path` must be a model package folder or a Hub repo id; no folder {name!r}")
    offline = hub_offline() if local_files_only is None else local_files_only
    folder = _snapshot(name, revision, token, cache_dir or hub_cache_dir(), offline)
    logger.info("resolved %s (revision %s) to %s", name, revision or "main", folder)
    return folder


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _snapshot(repo_id: str, revision: str | None, token: str | bool | None, cache_dir: Path | None,
              offline: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"the Hub cache {cache_dir}" if cache_dir is not None else "the default Hub cache"
    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=offline,
            allow_patterns=ALLOW_PATTERNS,
        )
    except GatedRepoError as error:
        raise PackageError(f"Hub repo {repo_id!r} is gated: accept its terms and pass `token` (or log in)") from error
    except RepositoryNotFoundError as error:
        raise PackageError(
            f"`name_or_path` {repo_id!r} is neither a local folder nor a Hub repo you can access "
            "(private repos need `token`)"
        ) from error
    except RevisionNotFoundError as error:
        raise PackageError(f"Hub repo {repo_id!r} has no revision {revision!r}") from error
    except IncompleteSnapshotError as error:
        raise PackageError(f"the cached snapshot of {repo_id!r} in {where} is incomplete: {error}") from error
    except LocalEntryNotFoundError as error:
        mode = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise PackageError(
            f"`name_or_path` {repo_id!r} (revision {revision or 'main'}) is not a local folder and not in {where}, "
            f"and {mode}"
        ) from error
    except HfHubHTTPError as error:
        raise PackageError(f"could not fetch Hub repo {repo_id!r}: {error}") from error
    return Path(folder)
