"""A real Hugging Face cache layout on disk, as `huggingface_hub` writes it when it downloads a repo.

    <cache>/models--<owner>--<name>/
        blobs/<sha256>                      every file's bytes, once, named by their hash
        refs/<branch or tag>                the commit the name points to
        snapshots/<commit>/<path>           relative symlinks into ../../blobs/

Nothing is downloaded: the files of a local folder are stored under a made-up commit, so tests can load packages
"from the Hub" offline (HF_HUB_OFFLINE=1) through the real `snapshot_download`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}"


def add_snapshot(cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",),
                 commit: str | None = None, prefix: str = "") -> Path:
    """Store every file under `folder` (at `prefix/` inside the repo) as commit `commit` (default: a hash of the
    contents) of `repo_id` in the cache `cache`, point `refs` at it; returns the snapshot folder."""
    files = sorted(path for path in Path(folder).rglob("*") if path.is_file())
    digests = {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    commit = commit or hashlib.sha1("".join(digests.values()).encode() + prefix.encode()).hexdigest()
    repo = repo_folder(cache, repo_id)
    snapshot = repo / "snapshots" / commit
    for path, digest in digests.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, blob)
        link = snapshot / prefix / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
