"""ONNX export per component: ONNX Runtime (CPU) against the torch oracles, graph structure per target, precision.

Oracles: our torch UNet / VAE (diffrt.export.models, loaded from the same checkpoint) and transformers' CLIP text
encoders with `output_hidden_states=True`. fp32 bound: max |ort - torch| <= 1e-4 * max(1, max |torch|), at two
resolutions and two batch sizes. Reduced precision is compared with the float32 oracle (fp16: 1e-2, bf16: 5e-2).
Packages: `tiny_package(kind)` (full fp32 exports, shared with the runtime tests); the other targets and precisions
are exported once per module below. Kinds other than sd15 are `slow` (one UNet export is tens of seconds on CPU).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from diffrt.export import export_pipeline
from diffrt.export.models import AutoencoderKL, UNet2DConditionModel
from diffrt.export.onnx import ComponentGraph, IOSpec, export_graph

SLOW_KINDS = ("sd2", "sdxl", "sdxl_refiner", "sd_inpaint", "lcm")
KINDS = ["sd15"] + [pytest.param(kind, marks=pytest.mark.slow) for kind in SLOW_KINDS]
TEXT_ENCODERS = {"sd15": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
                 "sdxl_refiner": ["text_encoder_2"], "sd_inpaint": ["text_encoder"], "lcm": ["text_encoder"]}
# (batch, latent height, latent width, context length): two resolutions, two batch sizes, one long-prompt context
UNET_CASES = [(1, 8, 8, 77), (2, 16, 24, 154)]
PROMPTS = ["a photo of a cat", "a painting of an astronaut riding a horse on the moon, high quality"]


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float, what: str) -> float:
    assert actual.shape == expected.shape, what
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected)))
    bound = tolerance * max(1.0, float(np.max(np.abs(expected))))
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
    return diff


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def manifest(package: Path) -> dict:
    return json.loads((package / "diffrt.json").read_text())


def unet_feeds(entry: dict, batch: int, height: int, width: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random UNet inputs drawn from the manifest's shapes (time_ids as SDXL's sizes/crops/scores)."""
    rng = np.random.default_rng(seed)
    sizes = {"batch": batch, "height": height, "width": width, "sequence": length}
    feeds = {}
    for io in entry["inputs"]:
        shape = [sizes[d] if isinstance(d, str) else d for d in io["shape"]]
        if io["name"] == "timestep":
            feeds["timestep"] = rng.uniform(0, 999, shape).astype(np.float32)
        elif io["name"] == "time_ids":
            row = [8.0 * height, 8.0 * width, 0.0, 0.0, 8.0 * height, 8.0 * width][: shape[1] - 1] + [6.0]
            feeds["time_ids"] = np.tile(np.array(row, np.float32), (batch, 1))
        else:
            feeds[io["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run_unet_parity(package: Path, checkpoint: Path, tolerance: float = 1e-4) -> list[float]:
    entry = manifest(package)["components"]["unet"]
    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    model = session(package / entry["file"])
    diffs = []
    for seed, (batch, height, width, length) in enumerate(UNET_CASES):
        feeds = unet_feeds(entry, batch, height, width, length, seed)
        with torch.no_grad():
            expected = unet(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        actual = model.run(["out_sample"], feeds)[0]
        diffs.append(assert_close(actual, expected, tolerance, f"unet {batch}x{height}x{width}"))
    return diffs


@pytest.mark.parametrize("kind", KINDS)
def test_unet_matches_our_torch_unet(tiny_package, tiny_checkpoint, kind):
    run_unet_parity(tiny_package(kind), tiny_checkpoint(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoders_match_transformers_with_every_hidden_state(tiny_package, tiny_checkpoint, kind):
    import transformers

    package, checkpoint = tiny_package(kind), tiny_checkpoint(kind)
    for name in TEXT_ENCODERS[kind]:
        tokenizer_folder = checkpoint / name.replace("text_encoder", "tokenizer")
        class_name = json.loads((checkpoint / "model_index.json").read_text())[name][1]
        oracle = getattr(transformers, class_name).from_pretrained(str(checkpoint / name)).eval()
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))
        model = session(package / name / "model.onnx")
        names = [o.name for o in model.get_outputs()]
        layers = oracle.config.num_hidden_layers
        pooled = "text_embeds" if class_name.endswith("Projection") else "pooler_output"
        normed = [] if class_name.endswith("Projection") else [f"normed_hidden_states.{i}" for i in range(1, layers)]
        assert names == ["last_hidden_state", pooled] + [f"hidden_states.{i}" for i in range(layers + 1)] + normed
        for prompts in (PROMPTS[:1], PROMPTS):  # batch 1 and batch 2
            ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
            outputs = dict(zip(names, model.run(names, {"input_ids": ids.input_ids.astype(np.int64)})))
            with torch.no_grad():
                reference = oracle(torch.from_numpy(ids.input_ids), output_hidden_states=True)
            expected = {"last_hidden_state": reference.last_hidden_state, pooled: getattr(reference, pooled)}
            expected |= {f"hidden_states.{i}": state for i, state in enumerate(reference.hidden_states)}
            norm = getattr(oracle, "text_model", oracle).final_layer_norm if normed else None
            with torch.no_grad():  # clip-skip outputs: final_layer_norm of each earlier layer
                expected |= {name: norm(reference.hidden_states[int(name.split(".")[1])]) for name in normed}
            for key, value in expected.items():
                assert_close(outputs[key], value.numpy(), 1e-4, f"{kind} {name} {key}")


@pytest.mark.slow
def test_four_level_unet_keeps_dynamic_sizes_down_to_one_pixel(tmp_path):
    """SD's UNet has four levels: at 8x8 latents its deepest feature map is 1x1, which a trace must not bake in."""
    from safetensors.torch import save_file

    config = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, cross_attention_dim=32,
                  attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=8, norm_num_groups=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "unet").mkdir(parents=True)
    (checkpoint / "unet" / "config.json").write_text(json.dumps(config))
    save_file(unet.state_dict(), str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
    (checkpoint / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    package = export_pipeline(checkpoint, tmp_path / "pkg", components=["unet"])
    run_unet_parity(package, checkpoint)


def test_vae_matches_our_torch_vae(tiny_package, tiny_checkpoint):
    package, checkpoint = tiny_package("sd15"), tiny_checkpoint("sd15")
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae")
    decoder, encoder = session(package / "vae_decoder/model.onnx"), session(package / "vae_encoder/model.onnx")
    rng = np.random.default_rng(0)
    for batch, height, width in [(1, 8, 8), (2, 4, 12)]:
        latents = (rng.standard_normal((batch, 4, height, width)) / 0.18215).astype(np.float32)
        images = rng.uniform(-1, 1, (batch, 3, 8 * height, 8 * width)).astype(np.float32)
        with torch.no_grad():
            decoded = vae.decode(torch.from_numpy(latents)).numpy()
            moments = vae.encode(torch.from_numpy(images)).numpy()
        assert_close(decoder.run(["sample"], {"latent_sample": latents})[0], decoded, 1e-4, "vae_decoder")
        assert_close(encoder.run(["latent_parameters"], {"sample": images})[0], moments, 1e-4, "vae_encoder")


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def default_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def domain_op_types(path: Path) -> set[tuple[str, str]]:
    return {(node.domain or "ai.onnx", node.op_type)
            for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_onnxruntime_target_uses_the_fused_attention_ops(tiny_package):
    """Text encoders: the standard opset-23 Attention; UNet and VAE: ORT's flash MultiHeadAttention (the standard
    node's CPU kernel materialises every score matrix, diffrt.export.attention_op); never a Softmax."""
    package = tiny_package("sd15")
    for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        path = package / name / "model.onnx"
        assert default_opset(path) == 23, name
        ops = domain_op_types(path)
        attention = ("ai.onnx", "Attention") if name == "text_encoder" else ("com.microsoft", "MultiHeadAttention")
        assert attention in ops and ("ai.onnx", "Softmax") not in ops, name
        if name != "text_encoder":
            assert ("ai.onnx", "Attention") not in ops, name


# ----- external data -----
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.proj = nn.Linear(16, 8)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(inputs[0]).mean(dim=(2, 3)))


def test_weights_above_the_threshold_go_to_one_external_file_ort_loads(tmp_path):
    torch.manual_seed(0)
    graph = ComponentGraph("toy", _Toy().eval(), [IOSpec("sample", "float32", ("batch", 4, "height", "width"))],
                           [IOSpec("out", "float32", ("batch", 8))], {"batch": (1, 4)}, {"batch": 2, "height": 6,
                           "width": 10}, [])
    inline = export_graph(graph, tmp_path / "inline", opset=23)
    external = export_graph(graph, tmp_path / "external", opset=23, external_data_threshold=0)
    assert inline.external_data is None and sorted(p.name for p in (tmp_path / "inline").iterdir()) == ["model.onnx"]
    assert external.external_data == "model.onnx_data"
    assert sorted(p.name for p in (tmp_path / "external").iterdir()) == ["model.onnx", "model.onnx_data"]
    matrices = sum(p.numel() * 4 for name, p in graph.module.named_parameters() if name.endswith("weight"))
    assert (tmp_path / "external" / "model.onnx_data").stat().st_size >= matrices  # (tiny biases may stay inline)
    assert (tmp_path / "external" / "model.onnx").stat().st_size < (tmp_path / "inline" / "model.onnx").stat().st_size
    sample = np.random.default_rng(0).standard_normal((3, 4, 5, 7)).astype(np.float32)
    with torch.no_grad():
        expected = graph.module(torch.from_numpy(sample)).numpy()
    actual = session(external.path).run(None, {"sample": sample})[0]
    assert_close(actual, expected, 1e-5, "toy with external data")


# ----- target tensorrt -----
@pytest.fixture(scope="module")
def tensorrt_package(tiny_checkpoint, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("trt") / "sd15_trt"
    return export_pipeline(tiny_checkpoint("sd15"), output, target="tensorrt", components=["unet"],
                           external_data_threshold=0)


@pytest.mark.slow
def test_tensorrt_target_is_opset_18_without_attention_op(tensorrt_package, tiny_checkpoint):
    path = tensorrt_package / "unet" / "model.onnx"
    assert default_opset(path) == 18 and manifest(tensorrt_package)["opset"] == 18
    ops = op_types(path)
    assert "Attention" not in ops and {"MatMul", "Softmax"} <= ops
    assert manifest(tensorrt_package)["components"]["unet"]["external_data"] == "model.onnx_data"
    run_unet_parity(tensorrt_package, tiny_checkpoint("sd15"))


# ----- reduced precision -----
def initializer_types(path: Path) -> set[str]:
    """Floating-point types of the weights (shape constants are int64 and not counted)."""
    model = onnx.load(str(path))
    names = {onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer if t.dims}
    return names & {"FLOAT", "FLOAT16", "BFLOAT16"}


def value_types(path: Path) -> dict[str, int]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    values = [*graph.value_info, *graph.input, *graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types |= {t.name: t.data_type for t in graph.initializer}
    return types


@pytest.fixture(scope="module")
def sdxl_fp16_package(tiny_checkpoint, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("fp16") / "sdxl_fp16"
    return export_pipeline(tiny_checkpoint("sdxl"), output, precision="fp16", components=["unet", "vae_decoder"])


@pytest.mark.slow
def test_fp16_unet_is_close_to_float32_and_keeps_float32_io(sdxl_fp16_package, tiny_checkpoint):
    entry = manifest(sdxl_fp16_package)["components"]["unet"]
    assert manifest(sdxl_fp16_package)["precision"] == "fp16" and entry["precision"] == "fp16"
    assert {io["dtype"] for io in entry["inputs"] + entry["outputs"]} == {"float32"}
    path = sdxl_fp16_package / "unet" / "model.onnx"
    assert "FLOAT16" in initializer_types(path)
    types = value_types(path)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "GroupNormalization":  # float32 island
            assert types[node.input[0]] == onnx.TensorProto.FLOAT, node.name
        if node.op_type == "Attention":
            assert types[node.input[0]] == onnx.TensorProto.FLOAT16
            assert {a.name: a.i for a in node.attribute}.get("softmax_precision") == onnx.TensorProto.FLOAT
    diffs = run_unet_parity(sdxl_fp16_package, tiny_checkpoint("sdxl"), tolerance=1e-2)
    assert max(diffs) > 1e-6  # really computed in float16, not silently float32
    assert entry["validation"]["max_abs_diff"] <= entry["validation"]["tolerance"]


@pytest.mark.slow
def test_sdxl_force_upcast_keeps_the_vae_decoder_float32(sdxl_fp16_package, tiny_checkpoint):
    entry = manifest(sdxl_fp16_package)["components"]["vae_decoder"]
    assert entry["precision"] == "fp32"
    assert initializer_types(sdxl_fp16_package / "vae_decoder" / "model.onnx") == {"FLOAT"}
    vae = AutoencoderKL.from_pretrained(tiny_checkpoint("sdxl"), subfolder="vae")
    latents = (np.random.default_rng(1).standard_normal((2, 4, 8, 8)) / 0.18215).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents)).numpy()
    actual = session(sdxl_fp16_package / "vae_decoder" / "model.onnx").run(None, {"latent_sample": latents})[0]
    assert_close(actual, expected, 1e-4, "float32 island")


@pytest.mark.slow
def test_fp16_fix_vae_is_exported_in_fp16_with_float32_softmax(tiny_checkpoint, tmp_path):
    """force_upcast false (the fp16-fix VAE) -> float16; tensorrt target wraps each Softmax in float32 casts."""
    checkpoint = tmp_path / "sdxl_fp16_fix"
    shutil.copytree(tiny_checkpoint("sdxl"), checkpoint)
    config_path = checkpoint / "vae" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "force_upcast": False}))
    package = export_pipeline(checkpoint, tmp_path / "pkg", precision="fp16", target="tensorrt",
                              components=["vae_decoder"])
    assert manifest(package)["components"]["vae_decoder"]["precision"] == "fp16"
    path = package / "vae_decoder" / "model.onnx"
    assert "FLOAT16" in initializer_types(path)
    types, model = value_types(path), onnx.load(str(path))
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    assert softmaxes and all(types[node.input[0]] == onnx.TensorProto.FLOAT for node in softmaxes)
    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae")
    latents = (np.random.default_rng(2).standard_normal((1, 4, 8, 12)) / 0.18215).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents)).numpy()
    actual = session(path).run(None, {"latent_sample": latents})[0]
    assert actual.dtype == np.float32
    assert_close(actual, expected, 1e-2, "fp16 vae decoder")


@pytest.mark.slow
def test_bf16_export_validates_with_bfloat16_weights(tiny_checkpoint, tmp_path):
    package = export_pipeline(tiny_checkpoint("sd15"), tmp_path / "pkg", precision="bf16", components=["vae_decoder"])
    entry = manifest(package)["components"]["vae_decoder"]
    assert entry["precision"] == "bf16" and entry["validation"] is not None
    assert entry["validation"]["max_abs_diff"] > 0
    assert "BFLOAT16" in initializer_types(package / "vae_decoder" / "model.onnx")
    assert {io["dtype"] for io in entry["inputs"] + entry["outputs"]} == {"float32"}
