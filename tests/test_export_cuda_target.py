"""Export target `cuda`: the graph structure here, the MultiHeadAttention lowering against torch on the CPU.

The fused kernels (GroupNorm, NhwcConv, SkipGroupNorm) exist on CUDA only, so the numbers of a whole fused graph are
checked on the GPU (tests/test_onnxruntime_cuda_gpu.py: images within 35 dB PSNR of the CPU float32 pipeline). What
runs here: the lowering we wrote (our attention as `com.microsoft.MultiHeadAttention`, which ONNX Runtime's CPU
provider also runs) before ORT's fusions, within 1e-4 of the torch module; and what the fusions and the float16
conversion leave in the graph.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_onnx import UNET_CASES, assert_close, unet_feeds

from diffrt.errors import ExportError, InputError
from diffrt.export import cuda_target, export_pipeline
from diffrt.export.attention_op import translation_table
from diffrt.export.models.attention import lower_to_multi_head_attention
from diffrt.export.onnx import export_graph, unet_graph, vae_graph
from diffrt.export.validate import reference_cases

FUSED_KERNELS = {"MultiHeadAttention", "NhwcConv", "SkipGroupNorm"}


@pytest.fixture(scope="module")
def cuda_package(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("cuda_target") / "sd15_cuda"
    return export_pipeline(tiny_checkpoint("sd15_cuda"), output, precision="fp16", target="cuda",
                           components=["text_encoder", "unet", "vae_decoder"])


def ops(path: Path) -> dict[str, set[str]]:
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, set[str]] = {}
    for node in model.graph.node:
        out.setdefault(node.domain or "ai.onnx", set()).add(node.op_type)
    return out


def test_unet_and_vae_are_built_from_ort_cuda_kernels(cuda_package):
    unet, vae = ops(cuda_package / "unet/model.onnx"), ops(cuda_package / "vae_decoder/model.onnx")
    assert FUSED_KERNELS | {"GroupNorm"} <= unet["com.microsoft"]
    assert {"MultiHeadAttention", "NhwcConv", "GroupNorm"} <= vae["com.microsoft"]
    for standard in (unet["ai.onnx"], vae["ai.onnx"]):  # nothing left of the unfused forms
        assert not standard & {"Softmax", "InstanceNormalization", "GroupNormalization", "Conv", "Attention"}
    # The text encoder uses standard operators only, attention included (MatMul-Softmax-MatMul).
    text = ops(cuda_package / "text_encoder/model.onnx")
    assert set(text) == {"ai.onnx"} and {"MatMul", "Softmax"} <= text["ai.onnx"] and "Attention" not in text["ai.onnx"]


def test_manifest_records_target_opsets_and_unvalidated_fused_components(cuda_package):
    manifest = json.loads((cuda_package / "diffrt.json").read_text())
    assert manifest["target"] == "cuda" and manifest["precision"] == "fp16"
    entries = manifest["components"]
    assert (entries["unet"]["opset"], entries["vae_decoder"]["opset"], entries["text_encoder"]["opset"]) == (18, 18, 18)
    # No GPU here: the fused graphs cannot run, and the manifest says they were not checked rather than passing.
    assert entries["unet"]["validation"] is None and entries["vae_decoder"]["validation"] is None
    assert entries["text_encoder"]["validation"]["max_abs_diff"] <= entries["text_encoder"]["validation"]["tolerance"]
    for entry in entries.values():
        assert {io["dtype"] for io in entry["inputs"] + entry["outputs"]} <= {"float32", "int64"}


def test_fp16_unet_keeps_the_timestep_embedding_in_float32(cuda_package):
    model = onnx.load(str(cuda_package / "unet/model.onnx"))
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in weights.values()
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    # From the float32 timestep to the sinusoid, no Cast to float16 and no float16 weight on the way.
    frontier, seen, sinusoid = ["timestep"], set(), []
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name in seen or node.op_type in ("Gemm", "MatMul"):
                continue
            seen.add(node.name)
            if node.op_type in ("Sin", "Cos"):
                sinusoid.append(node)
                continue
            casts = [a.i for a in node.attribute if a.name == "to"]
            assert casts != [onnx.TensorProto.FLOAT16], node.name
            assert all(weights.get(i) != onnx.TensorProto.FLOAT16 for i in node.input), node.name
            frontier.extend(node.output)
    assert len(sinusoid) == 2


def test_the_package_refuses_a_provider_without_cuda(cuda_package):
    from diffrt.runtime import DiffusionPipeline

    with pytest.raises(InputError, match=r"`provider` 'cpu' cannot run this package: it was exported with "
                                         r"--target cuda"):
        DiffusionPipeline.from_pretrained(cuda_package)


@pytest.mark.parametrize("component", ["unet", "vae_decoder"])
def test_multi_head_attention_lowering_matches_torch(tiny_checkpoint, tmp_path, component):
    """Before ORT's fusions, the lowered graph runs on the CPU: it must equal the unlowered torch module."""
    checkpoint = tiny_checkpoint("sd15_cuda")
    graph = unet_graph(checkpoint, None, None, False) if component == "unet" else \
        vae_graph("vae_decoder", checkpoint, None)
    cases = reference_cases(graph)  # from the module as it is: one SDPA per attention
    lower_to_multi_head_attention(graph.module)
    exported = export_graph(graph, tmp_path / component, cuda_target.FUSED_OPSET,
                            translations=translation_table())
    assert "MultiHeadAttention" in ops(exported.path)["com.microsoft"]
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for case in cases:
        actual = session.run(None, case.inputs)[0]
        assert_close(actual, next(iter(case.expected.values())), 1e-4, f"{component} {case.sizes}")
    if component == "unet":  # and the usual UNet cases (long-prompt context, two resolutions)
        entry = {"inputs": [s.manifest() for s in graph.inputs]}
        for seed, (batch, height, width, length) in enumerate(UNET_CASES):
            feeds = unet_feeds(entry, batch, height, width, length, seed)
            with torch.no_grad():
                expected = graph.module(*(torch.from_numpy(v) for v in feeds.values())).numpy()
            assert_close(session.run(None, feeds)[0], expected, 1e-4, f"unet {batch}x{height}x{width}")


def test_weights_above_the_threshold_go_to_one_aligned_external_file(cuda_package, tiny_checkpoint, tmp_path):
    external = export_pipeline(tiny_checkpoint("sd15_cuda"), tmp_path / "external", precision="fp16", target="cuda",
                               components=["unet"], external_data_threshold=0)
    entry = json.loads((external / "diffrt.json").read_text())["components"]["unet"]
    assert entry["external_data"] == "model.onnx_data" and (external / "unet/model.onnx_data").is_file()
    assert json.loads((cuda_package / "diffrt.json").read_text())["components"]["unet"]["external_data"] is None
    stored = onnx.load(str(external / "unet/model.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in stored.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(offset % 4096 == 0 for offset in offsets)
    # The same fused graph and the same weights as the package that keeps them inline.
    inline = onnx.load(str(cuda_package / "unet/model.onnx"))
    loaded = onnx.load(str(external / "unet/model.onnx"))
    assert [n.op_type for n in loaded.graph.node] == [n.op_type for n in inline.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in inline.graph.initializer}
    assert len(weights) == len(loaded.graph.initializer)
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), weights[tensor.name])


def test_group_norms_beyond_ort_cuda_kernel_are_refused(tiny_checkpoint, tmp_path):
    # The plain tiny SD 1.5 has one channel per group (32 channels, 32 groups); ORT's kernel needs an even count.
    with pytest.raises(ExportError, match=r"unet: a GroupNorm of 32 channels in 32 groups \(1 per group\) is beyond "
                                          r"ONNX Runtime's CUDA kernel .* --target onnxruntime"):
        export_pipeline(tiny_checkpoint("sd15"), tmp_path / "out", precision="fp16", target="cuda",
                        components=["unet"])
    assert not (tmp_path / "out").exists()
