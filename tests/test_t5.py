"""T5 text encoder export (ONNX Runtime against transformers' T5EncoderModel) and the T5 tokenizer folder.

fp32 bound: max |ort - torch| <= 1e-4 * max(1, max |torch|) on real tokenizer ids, two sequence lengths, batch 1
and 2. fp16: validated by the exporter against the float32 model (1e-2), with every `wo` projection float32; a
copy whose `wo` outputs pass float16's range shows why the island is there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from checkpoint_fixtures import make_t5

from diffrt.errors import ConfigError, ExportError
from diffrt.export.component import check_options, export_component
from diffrt.export.t5_encoder import T5_SEQUENCE_RANGE, t5_encoder_graph

NAME = "text_encoder_3"
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon"]


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A folder holding `text_encoder_3` (the tiny T5 encoder) and the tokenizer it was built with."""
    root = tmp_path_factory.mktemp("t5")
    model, tokenizer = make_t5(root)
    model.save_pretrained(root / NAME)
    return root, tokenizer


def export(root: Path, precision: str, target: Path, name: str = NAME) -> dict:
    rows: list = []
    entry = export_component(t5_encoder_graph(name, root, None), precision, target, check_options(precision), rows)
    return entry


@pytest.fixture(scope="module")
def fp32_package(t5_checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    target = tmp_path_factory.mktemp("t5_fp32")
    return target, export(t5_checkpoint[0], "fp32", target)


def reference(root: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(str(root / NAME)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids))[0].numpy()


def test_manifest_entry_names_optimum_io_and_dynamic_sequence(fp32_package):
    _, entry = fp32_package
    assert [io["name"] for io in entry["inputs"]] == ["input_ids"]
    assert entry["inputs"][0]["shape"] == ["batch", "sequence"]
    assert [io["name"] for io in entry["outputs"]] == ["last_hidden_state"]
    assert entry["outputs"][0]["shape"] == ["batch", "sequence", 32]
    assert entry["dims"]["sequence"] == list(T5_SEQUENCE_RANGE)
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]
    assert entry["parameters"], "adapters need the weight map"


@pytest.mark.parametrize("length", [9, 40])
@pytest.mark.parametrize("batch", [1, 2])
def test_fp32_matches_transformers_on_tokenizer_ids(t5_checkpoint, fp32_package, length, batch):
    root, tokenizer = t5_checkpoint
    target, _ = fp32_package
    ids = tokenizer(PROMPTS[:batch], padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids.astype(np.int64)
    session = ort.InferenceSession(str(target / NAME / "model.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": ids})
    expected = reference(root, ids)
    assert actual.shape == expected.shape == (batch, length, 32)
    diff = float(np.max(np.abs(actual - expected)))
    assert diff <= 1e-4 * max(1.0, float(np.max(np.abs(expected)))), diff


def projection_dtypes(entry: dict, path: Path) -> dict[str, int]:
    """ONNX element type of each feed-forward projection weight, found through the manifest's parameter map."""
    initializers = {init.name: init.data_type for init in onnx.load(str(path)).graph.initializer}
    return {name: initializers[places[0][0]] for name, places in entry["parameters"].items()
            if "DenseReluDense" in name}


def test_fp16_keeps_wo_in_float32(t5_checkpoint, tmp_path):
    entry = export(t5_checkpoint[0], "fp16", tmp_path)
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]
    dtypes = projection_dtypes(entry, tmp_path / NAME / "model.onnx")
    wo = {name: t for name, t in dtypes.items() if ".wo." in name}
    wi = {name: t for name, t in dtypes.items() if ".wi." in name}
    assert len(wo) == 2 and set(wo.values()) == {onnx.TensorProto.FLOAT}, dtypes
    assert len(wi) == 2 and set(wi.values()) == {onnx.TensorProto.FLOAT16}, dtypes


@pytest.fixture(scope="module")
def overflowing_checkpoint(tmp_path_factory) -> Path:
    """The tiny T5 with its `wo` weights scaled (to at most 6e4, which float16 holds) so the feed-forward outputs pass
    float16's 65504, as T5 v1.1 XXL's do on real prompts; the norms bring them back to unit scale."""
    root = tmp_path_factory.mktemp("t5_overflow")
    model, _ = make_t5(root)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".wo." in name:
                parameter.mul_(6e4 / parameter.abs().max())
    model.save_pretrained(root / NAME)
    return root


def test_fp16_island_carries_feed_forward_outputs_past_float16_range(overflowing_checkpoint, tmp_path):
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(str(overflowing_checkpoint / NAME)).eval()
    with torch.no_grad():
        ids = torch.tensor([[5, 9, 13, 7, 1]])
        peak = max(block.layer[-1].DenseReluDense(block.layer[-1].layer_norm(state)).abs().max()
                   for block, state in zip(model.encoder.block, model(ids, output_hidden_states=True).hidden_states))
    assert peak > 65504  # what float16 cannot hold (the weights themselves it can)
    entry = export(overflowing_checkpoint, "fp16", tmp_path)
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]


def test_fp16_without_the_island_fails_validation(overflowing_checkpoint, tmp_path, monkeypatch):
    from diffrt.export import t5_encoder

    monkeypatch.setattr(t5_encoder, "mark_float32_islands", lambda model: [])
    with pytest.raises(ExportError):
        export(overflowing_checkpoint, "fp16", tmp_path)


def test_model_type_other_than_t5_is_refused(t5_checkpoint, tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text('{"model_type": "clip_text_model"}')
    with pytest.raises(ConfigError, match="text_encoder model_type"):
        t5_encoder_graph("text_encoder", tmp_path, None)


def test_bf16_validates_without_island(t5_checkpoint, tmp_path):
    entry = export(t5_checkpoint[0], "bf16", tmp_path)
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]
    dtypes = projection_dtypes(entry, tmp_path / NAME / "model.onnx")
    assert set(dtypes.values()) == {onnx.TensorProto.BFLOAT16}, dtypes
