"""Small ONNX graphs for engine and package tests, saved the one way every test needs (opset 17, IR 8)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import onnx
from onnx import helper


def save_graph(path: Path, nodes: Sequence[Any], inputs: Sequence[Any], outputs: Sequence[Any],
               initializers: Sequence[Any] = (), name: str = "graph", external_data: bool = False) -> Path:
    """Build, check and save a one-graph model at `path` (weights in `<name>_data` beside it if `external_data`)."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save(model, path, save_as_external_data=True, location=path.name + "_data", size_threshold=0)
    else:
        onnx.save(model, path)
    return path
