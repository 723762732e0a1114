"""The import rules of docs/architecture.md, checked on the source itself (ast, every import, lazy ones included).

- `package/` (the format) and `errors.py` sit at the bottom; `rng`/`schedulers/` and `runtime/` above them never
  import `export/`, `bench/` or `cli/`; `export/` never imports `cli/` or `bench/`; nothing below `cli/` and
  `serve/` imports them; `serve/` (the HTTP service) never imports `cli/`, `export/` or `bench/`.
- No import cycle between diffrt's modules, lazy or not (a package's `__init__` importing its own submodules is
  how packages work, not a cycle, so the implicit parent imports are not edges).
- The format's file names are spelled once, in `diffrt/package/names.py`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "diffrt"
# layer -> the layers it must never import
FORBIDDEN = {
    "diffrt.package": ("diffrt.runtime", "diffrt.export", "diffrt.bench", "diffrt.cli", "diffrt.schedulers",
                       "diffrt.serve"),
    "diffrt.errors": ("diffrt.",),
    "diffrt.rng": ("diffrt.runtime", "diffrt.export", "diffrt.bench", "diffrt.cli", "diffrt.schedulers",
                   "diffrt.serve"),
    "diffrt.schedulers": ("diffrt.runtime", "diffrt.export", "diffrt.bench", "diffrt.cli", "diffrt.serve"),
    "diffrt.runtime": ("diffrt.export", "diffrt.bench", "diffrt.cli", "diffrt.serve"),
    "diffrt.export": ("diffrt.bench", "diffrt.cli", "diffrt.serve"),
    "diffrt.bench": ("diffrt.cli", "diffrt.serve"),
    # the HTTP service sits at the top beside cli/: it serves packages, so it needs no exporter or benchmark
    "diffrt.serve": ("diffrt.cli", "diffrt.export", "diffrt.bench"),
}
FORMAT_NAMES = {"diffrt.json", "model_index.json", "model.onnx", "model.onnx_data", "diffrt-package",
                "scheduler_config.json"}
ALLOWED_IMPORTS = {("diffrt.errors", "diffrt.errors")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in SOURCE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """diffrt modules `name` imports anywhere in its file (module names resolved, `from x import submodule` too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import diffrt.x.y.attr` -> diffrt.x.y
                target = target.rpartition(".")[0]
            if target.startswith("diffrt"):
                found.add(target)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except those under `if TYPE_CHECKING:` (annotations only: nothing is imported at run time)."""
    nodes: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                pending.extend(child.orelse)
                continue
            pending.append(child)
    return nodes


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        parents = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        # a submodule importing its own package's __init__ (or the package importing its submodule) is structure
        graph[name] = {t for t in imports_of(name, path, known) if t != name and t not in parents
                       and not t.startswith(name + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # a function-level import (pipelines resolve their class lazily), relative ones (the schedulers import their
    # base module as `.base`), and none of the imports made for type annotations only
    assert "diffrt.runtime.pipelines.registry" in graph["diffrt.runtime.pipelines.base"]
    assert "diffrt.schedulers.base" in graph["diffrt.schedulers.ddpm"]
    assert "diffrt.runtime.pipelines.base" not in graph["diffrt.runtime.pipelines.registry"]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    graph = import_graph()
    bad = sorted(f"{module} -> {target}" for module, targets in graph.items()
                 if module == layer or module.startswith(layer + ".")
                 for target in targets
                 if any(target == f or target.startswith(f if f.endswith(".") else f + ".") or target == f.rstrip(".")
                        for f in FORBIDDEN[layer]) and (module, target) not in ALLOWED_IMPORTS)
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in found)


def test_format_names_are_spelled_once():
    spelled: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in FORMAT_NAMES:
                spelled.setdefault(node.value, []).append(f"{name}:{node.lineno}")
    for value, places in spelled.items():
        assert places == [p for p in places if p.startswith("diffrt.package.names:")], (value, places)
        assert len(places) == 1, (value, places)
