"""The UNet's `timestep` feed: one value per batch row (diffrt's graphs) or one scalar (Optimum's graphs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import save_graph

from diffrt.errors import InputError
from diffrt.runtime.engines import create_engine
from diffrt.runtime.pipelines.timestep import scalar_timestep


def unet_graph(path: Path, timestep_shape: list) -> Path:
    """out_sample = sample * timestep (broadcast), with `timestep` of the given shape."""
    return save_graph(path, [helper.make_node("Mul", ["sample", "timestep"], ["out_sample"])],
                      [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 2]),
                       helper.make_tensor_value_info("timestep", TensorProto.FLOAT, timestep_shape)],
                      [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 2])])


def test_a_scalar_timestep_graph_gets_the_batch_value(tmp_path: Path) -> None:
    engine = create_engine(unet_graph(tmp_path / "scalar.onnx", []))
    feeds = {"sample": np.ones((2, 2), np.float32), "timestep": np.full((2,), 981.0, np.float32)}
    adapted = scalar_timestep(engine, feeds)
    assert adapted["timestep"].shape == () and adapted["timestep"] == 981.0
    np.testing.assert_array_equal(engine.run(adapted)["out_sample"], np.full((2, 2), 981.0, np.float32))


def test_a_per_row_timestep_graph_is_fed_unchanged(tmp_path: Path) -> None:
    engine = create_engine(unet_graph(tmp_path / "rows.onnx", ["batch", 1]))
    feeds = {"sample": np.ones((2, 2), np.float32), "timestep": np.full((2, 1), 5.0, np.float32)}
    assert scalar_timestep(engine, feeds) is feeds


def test_different_timesteps_cannot_become_one_scalar(tmp_path: Path) -> None:
    engine = create_engine(unet_graph(tmp_path / "scalar.onnx", []))
    feeds = {"sample": np.ones((2, 2), np.float32), "timestep": np.array([981.0, 961.0], np.float32)}
    with pytest.raises(InputError, match=r"`timestep` must be one value for the whole batch \(this UNet takes a "
                                         r"scalar\); got \[981.0, 961.0\]"):
        scalar_timestep(engine, feeds)
