"""Model packages that ship inside the diffrt wheel, addressed by a short name (e.g. `digits`)."""
from __future__ import annotations

from pathlib import Path

from diffrt.package.names import INDEX_NAME

# Folders of packages shipped in the wheel (data, not code): diffrt/builtin_packages/<name>/
BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "builtin_packages"


def builtin_names() -> list[str]:
    if not BUILTIN_ROOT.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_ROOT.iterdir() if (p / INDEX_NAME).is_file())


def resolve_builtin(name_or_path: str | Path) -> str | Path:
    """A built-in package's folder for its short name; anything else is returned unchanged."""
    local_package = (Path(name_or_path) / INDEX_NAME).is_file()
    if isinstance(name_or_path, str) and "/" not in name_or_path and not local_package:
        candidate = BUILTIN_ROOT / name_or_path
        if (candidate / INDEX_NAME).is_file():
            return candidate
    return name_or_path
