"""Where a package may be written: the checks on an output folder before anything is exported into it.

`--overwrite` replaces a folder only when nothing of the user's is lost with it. The rule (docs/package-format.md,
"Writing a package"): the folder is empty, or it is a model package, and it holds nothing else:

- a model package is a diffrt package (`diffrt.json` with `"format": "diffrt-package"`) or an Optimum-layout
  package (`model_index.json` listing at least one component folder that holds a `model.onnx`);
- its top level holds only `diffrt.json`, `model_index.json`, the component folders model_index.json (or
  diffrt.json) names and diffrt's own temp folders (`.NAME.tmp-*` of an interrupted `--into` addition); no file
  anywhere in it is checkpoint weights (`.safetensors`, `.bin`, `.ckpt`, `.pt`, `.pth`, `.msgpack`, `.h5`): a
  diffusers checkpoint, or a repository mixing ONNX and PyTorch weights, is never replaced.

Anything else is refused with an error naming the folder and what in it is not part of a package. The output must
also lie apart from every source (not the source, not inside it, not holding it), and its nearest existing parent
must be a writable folder: these are found before the export loads or writes anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from diffrt.errors import InputError, invalid, listing
from diffrt.package.leftovers import is_temp_folder
from diffrt.package.names import FORMAT_NAME, INDEX_NAME, MANIFEST_NAME, MODEL_FILE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")


def output_path(output: str | os.PathLike[str]) -> Path:
    """The output as an absolute path (`.` becomes the current folder's own name, so temp folders go beside it)."""
    path = Path(os.path.abspath(os.fspath(output)))
    if path.name == "":
        raise invalid("output", "a folder below the file system root", str(output))
    return path


def check_output(output: Path, overwrite: bool, sources: Iterable[tuple[str, Path]] = ()) -> None:
    """Refuse an output that overlaps a source, an existing output unless `overwrite` and it is a replaceable
    package, and a place that cannot be written; InputError naming the folder."""
    check_apart(output, sources)
    if output.exists() and not overwrite:
        raise invalid("output", "a path that does not exist yet (pass overwrite=True, or --overwrite, to replace it)",
                      str(output))
    if output.exists() and not output.is_dir():
        raise invalid("output", "a folder path (an existing file is never replaced)", str(output))
    if output.exists():
        problem = not_replaceable(output)
        if problem is not None:
            raise InputError(f"`output` {str(output)!r} is not replaced: {problem}; --overwrite replaces only a model "
                             "package (diffrt or Optimum layout) holding nothing else")
    _check_writable(output)


def check_apart(output: Path, sources: Iterable[tuple[str, Path]]) -> None:
    """The output may not be a source, lie inside one, or hold one (symlinks resolved): replacing it would delete
    the source, and a package inside a checkpoint would be read as part of it."""
    out = Path(output).resolve()
    for what, source in sources:
        src = Path(source).resolve()
        if out == src:
            relation = "is"
        elif out.is_relative_to(src):
            relation = "lies inside"
        elif src.is_relative_to(out):
            relation = "holds"
        else:
            continue
        raise InputError(f"`output` {str(output)!r} {relation} the {what} {str(source)!r}; choose an output folder "
                         "apart from it")


def not_replaceable(folder: Path) -> str | None:
    """Why `--overwrite` must not replace `folder` (None: it may); see the module docstring for the rule."""
    entries = sorted(folder.iterdir())
    if not entries:
        return None
    components = _package_components(folder)
    if components is None:
        return (f"it is not a model package (no {MANIFEST_NAME} of a diffrt package, no {INDEX_NAME} with ONNX "
                "components)")
    allowed = {MANIFEST_NAME, INDEX_NAME, *components}
    others = [entry.name for entry in entries if not is_temp_folder(entry) and (
        entry.name not in allowed or (entry.name in components and not entry.is_dir()))]
    if others:
        return f"it holds {listing(others)}, which a model package does not"
    weights = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
               if p.suffix in WEIGHT_SUFFIXES and not p.is_dir()]
    if weights:
        return f"it holds checkpoint weights ({listing(weights)})"
    return None


def _package_components(folder: Path) -> set[str] | None:
    """The component folder names of the package in `folder`; None when it is no model package."""
    manifest, index = _json_object(folder / MANIFEST_NAME), _json_object(folder / INDEX_NAME)
    named = {name for name, value in index.items() if isinstance(value, list)}
    if manifest.get("format") == FORMAT_NAME:
        listed = manifest.get("components")
        return named | (set(listed) if isinstance(listed, dict) else set())
    if any((folder / name / MODEL_FILE).is_file() for name in named):
        return named
    return None


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_writable(output: Path) -> None:
    """The nearest existing folder above (or at) `output` must accept new entries: a read-only file system or a
    file in the way is reported now, not after the export's work."""
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"`output` {str(output)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"`output` {str(output)!r} cannot be created: {str(ancestor)!r} is not writable "
                         "(read-only file system or no permission)")
