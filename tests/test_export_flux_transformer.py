"""Our export FluxTransformer2DModel against diffusers': same state-dict names and shapes, same outputs on the same
weights, and an ONNX export whose batch, image and text lengths stay dynamic.

Oracle: diffusers' `FluxTransformer2DModel` fed the same random weights and inputs, ids built as `FluxPipeline`
builds them. Tolerance: 1e-5 max abs difference relative to the output's largest magnitude when that exceeds 1
(float32 on CPU); 1e-4 for ONNX Runtime, whose kernels sum in a different order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
DiffusersFluxPosEmbed = pytest.importorskip("diffusers.models.transformers.transformer_flux").FluxPosEmbed

from diffrt.errors import ConfigError, InputError  # noqa: E402
from diffrt.export.models import FluxTransformer2DModel  # noqa: E402
from diffrt.export.models.attention import Attention, lower_to_multi_head_attention  # noqa: E402
from diffrt.export.models.flux_embeddings import FluxPosEmbed  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "model_configs"
TINY: dict[str, Any] = {
    "patch_size": 1, "in_channels": 8, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 12, "pooled_projection_dim": 10, "axes_dims_rope": [4, 6, 6],
}
TEXT_TOKENS = 7
# (batch, latent rows, latent columns) after packing; 3x5 is non-square.
CASES = [(batch, rows, cols) for batch in (1, 2) for rows, cols in ((4, 4), (3, 5))]
TOL = 1e-5
INPUT_NAMES = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
               "guidance"]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    error = (ours - ref).abs().max().item()
    assert error <= tol * scale, f"max abs diff {error:.3g} exceeds {tol} x {scale:.3g}"


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """`FluxPipeline._prepare_latent_image_ids`: column 1 the row, column 2 the column, column 0 zero."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def flux_inputs(batch: int, rows: int, cols: int, text_tokens: int = TEXT_TOKENS, guidance: bool = True,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs as FluxPipeline passes them: timestep = t / 1000, the raw guidance scale, 2-D ids, zero text ids."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(batch, rows * cols, TINY["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_tokens, TINY["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(batch, TINY["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor([1.0, 0.35, 0.7][:batch]),
        "img_ids": image_ids(rows, cols),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if guidance:
        inputs["guidance"] = torch.tensor([3.5, 5.0, 1.0][:batch])
    return inputs


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These models are tiny: a second intra-op thread only adds spin-waiting on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flux_pair():
    """guidance_embeds -> (diffusers model, our model) with the same random weights (scaled up from diffusers'
    near-zero init so every block moves the output)."""
    cache: dict[bool, tuple[torch.nn.Module, FluxTransformer2DModel]] = {}

    def get(guidance: bool) -> tuple[torch.nn.Module, FluxTransformer2DModel]:
        if guidance not in cache:
            config = {**TINY, "guidance_embeds": guidance}
            ref = diffusers.FluxTransformer2DModel(**config).eval()
            gen = torch.Generator().manual_seed(1)
            state = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in ref.state_dict().items()}
            ref.load_state_dict(state)
            cache[guidance] = ref, FluxTransformer2DModel.from_state_dict(config, state)
        return cache[guidance]

    return get


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@pytest.mark.parametrize("batch,rows,cols", CASES)
def test_transformer_matches_diffusers(flux_pair, guidance, batch, rows, cols):
    ref, ours = flux_pair(guidance)
    inputs = flux_inputs(batch, rows, cols, guidance=guidance)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        actual = ours(**inputs)
    assert actual.shape == (batch, rows * cols, TINY["in_channels"])
    assert_close(actual, expected)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_published_config_builds_diffusers_state_dict_on_meta(variant):
    config = json.loads((CONFIGS / f"black-forest-labs--FLUX.1-{variant}--transformer.json").read_text())
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel.from_config(config)
        ours = FluxTransformer2DModel.from_config(config)
    expected = {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == expected
    assert ("time_text_embed.guidance_embedder.linear_1.weight" in expected) == (variant == "dev")
    assert ours.config["guidance_embeds"] == (variant == "dev")


@pytest.mark.parametrize("key,value", [
    ("axes_dims_rope", [16, 56, 48]),  # does not sum to attention_head_dim
    ("axes_dims_rope", [15, 57, 56]),  # odd: channel pairs would straddle two axes
    ("guidance_embeds", "yes"),
    ("num_attention_heads", 0),
    ("out_channels", -1),
])
def test_unsupported_config_raises_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        FluxTransformer2DModel(**{**TINY, key: value})


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_guidance_is_required_exactly_when_configured(guidance_embeds):
    model = FluxTransformer2DModel(**{**TINY, "guidance_embeds": guidance_embeds})
    inputs = flux_inputs(1, 2, 2, guidance=not guidance_embeds)
    with pytest.raises(InputError, match="`guidance`"):
        model(**inputs)


def test_rotary_embedding_matches_diffusers_float64_at_4096px_positions():
    """Float32 graph arithmetic, yet within one ulp of diffusers' float64 angles up to a 256x256 latent grid."""
    ids = torch.cat([torch.zeros(16, 3), image_ids(256, 256)])
    axes = [16, 56, 56]
    expected = DiffusersFluxPosEmbed(10000, axes)(ids)
    actual = FluxPosEmbed(10000, axes)(ids)
    for ours, theirs in zip(actual, expected):
        assert ours.dtype == torch.float32 and ours.shape == (ids.shape[0], 128)
        assert (ours - theirs).abs().max().item() <= 2.5e-7


def test_onnx_rotary_embedding_keeps_float64_accuracy_in_onnxruntime(tmp_path):
    """ONNX Runtime's float32 Cos/Sin on the split angles stay within one ulp of diffusers' float64 embedding."""
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    axes = [16, 56, 56]
    program = torch.onnx.export(FluxPosEmbed(10000, axes).eval(), (image_ids(3, 4),), dynamo=True, opset_version=23,
                                input_names=["ids"], dynamic_shapes=({0: Dim("tokens")},), verbose=False)
    assert program is not None
    program.save(str(tmp_path / "rope.onnx"))
    session = ort.InferenceSession(str(tmp_path / "rope.onnx"), providers=["CPUExecutionProvider"])
    ids = image_ids(256, 256)
    expected = DiffusersFluxPosEmbed(10000, axes)(ids)
    for actual, theirs in zip(session.run(None, {"ids": ids.numpy()}), expected):
        assert float(np.abs(actual - theirs.numpy()).max()) <= 2.5e-7


def test_lower_to_multi_head_attention_switches_every_attention_and_keeps_output(flux_pair):
    ref, ours = flux_pair(True)
    inputs = flux_inputs(2, 3, 5)
    with torch.no_grad():
        before = ours(**inputs)
        try:
            assert lower_to_multi_head_attention(ours) == TINY["num_layers"] + TINY["num_single_layers"]
            assert all(m.fused_op for m in ours.modules() if isinstance(m, Attention))
            after = ours(**inputs)
        finally:
            for module in ours.modules():
                if isinstance(module, Attention):
                    module.fused_op = False
    assert_close(after, before)


def test_from_pretrained_reads_a_diffusers_folder(flux_pair, tmp_path):
    ref, _ = flux_pair(False)
    ref.save_pretrained(tmp_path / "transformer")
    ours = FluxTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    inputs = flux_inputs(1, 3, 5, guidance=False)
    with torch.no_grad():
        assert_close(ours(**inputs), ref(**inputs, return_dict=False)[0])


@pytest.mark.filterwarnings("ignore:.*axis name.*will not be used")
def test_onnx_export_keeps_batch_image_and_text_lengths_dynamic(flux_pair, tmp_path):
    """Traced at one size, run by ONNX Runtime at other batch sizes, image grids and text lengths."""
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    _, model = flux_pair(True)
    batch, image, text = Dim("batch"), Dim("image_tokens"), Dim("text_tokens")
    dynamic = {
        "hidden_states": {0: batch, 1: image}, "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch}, "timestep": {0: batch}, "img_ids": {0: image}, "txt_ids": {0: text},
        "guidance": {0: batch},
    }
    trace = flux_inputs(2, 3, 4, text_tokens=5)
    with torch.no_grad():
        program = torch.onnx.export(
            model, tuple(trace[name] for name in INPUT_NAMES), dynamo=True, opset_version=23,
            input_names=INPUT_NAMES, output_names=["sample"], dynamic_shapes=dynamic, verbose=False,
        )
    assert program is not None
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["hidden_states"] == ["batch", "image_tokens", TINY["in_channels"]]
    assert shapes["txt_ids"] == ["text_tokens", 3] and shapes["guidance"] == ["batch"]
    for case in ((1, 5, 3, 7), (3, 2, 6, 4)):
        inputs = flux_inputs(*case[:3], text_tokens=case[3], seed=2)
        with torch.no_grad():
            expected = model(**inputs).numpy()
        (actual,) = session.run(None, {name: inputs[name].numpy() for name in INPUT_NAMES})
        assert actual.shape == expected.shape == (case[0], case[1] * case[2], TINY["in_channels"])
        scale = max(1.0, float(np.abs(expected).max()))
        assert float(np.abs(actual - expected).max()) <= 1e-4 * scale
