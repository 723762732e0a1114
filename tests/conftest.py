"""Shared test setup: GPU tests skip without CUDA; tiny checkpoints are built once per session."""
from __future__ import annotations

import importlib.util

import pytest


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is not None:
        import torch

        return torch.cuda.is_available()
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


# Session fixtures `tiny_checkpoint`, `any_tiny_checkpoint`, `checkpoints_root` (tiny diffusers checkpoints).
from checkpoint_fixtures import (  # noqa: E402,F401
    any_tiny_checkpoint,
    checkpoints_root,
    tiny_checkpoint,
    tiny_controlnet,
    tiny_controlnet_package,
    tiny_deep_cache_package,
    tiny_package,
)

# Session fixture `optimum_python`: the real Optimum in its own cached venv (tests/optimum_env.py).
from optimum_env import optimum_python  # noqa: E402,F401
