"""Our export SD3 / SD3.5 MMDiT against diffusers: same state-dict keys and shapes, same outputs on the same weights,
and an ONNX export whose batch, latent size and text length stay dynamic.

Oracle: the installed diffusers `SD3Transformer2DModel` (and `FluxAttention` for the shared joint attention), fed the
same random weights and inputs. Tolerance: 1e-5 max abs difference relative to the output's largest magnitude when
that exceeds 1 (float32 on CPU); ONNX Runtime against our torch module: 1e-4 of the output scale.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffrt.errors import ConfigError  # noqa: E402
from diffrt.export.models import SD3Transformer2DModel  # noqa: E402
from diffrt.export.models.attention import lower_to_multi_head_attention  # noqa: E402
from diffrt.export.models.dit import JointAttention, apply_rotary_emb  # noqa: E402

TINY_SD3: dict[str, Any] = {
    "sample_size": 16, "patch_size": 2, "in_channels": 4, "num_layers": 3, "attention_head_dim": 8,
    "num_attention_heads": 2, "joint_attention_dim": 12, "caption_projection_dim": 16, "pooled_projection_dim": 10,
    "out_channels": 4, "pos_embed_max_size": 12,
}
# SD3.5: per-head RMS q/k norm and a second image-only attention in the first blocks (all but the last here).
TINY_SD35 = {**TINY_SD3, "qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}
# The published transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers and -3.5-medium.
SD3_MEDIUM: dict[str, Any] = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}
SD35_MEDIUM = {**SD3_MEDIUM, "dual_attention_layers": list(range(13)), "pos_embed_max_size": 384, "qk_norm": "rms_norm"}
CONFIGS = {"sd3": TINY_SD3, "sd35": TINY_SD35}
# (batch, latent height, latent width): square, and non-square with an odd patch count (3 x 5 patches).
CASES = [(batch, height, width) for batch in (1, 2) for height, width in ((8, 8), (6, 10))]
INPUT_NAMES = ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"]
TOL = 1e-5


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    error = (ours - ref).abs().max().item()
    assert error <= tol * scale, f"max abs diff {error:.3g} exceeds {tol} x {scale:.3g}"
    return error


def random_state_dict(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights far from diffusers' init (zero-initialised gates would hide whole branches); the position table is
    kept, since it is a fixed function of the config."""
    gen = torch.Generator().manual_seed(seed)
    return {name: tensor if name.endswith("pos_embed.pos_embed") else torch.randn(tensor.shape, generator=gen) * 0.3
            for name, tensor in module.state_dict().items()}


def inputs(config: dict[str, Any], batch: int, height: int, width: int, sequence: int = 7,
           seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, config["in_channels"], height, width, generator=gen),
            torch.randn(batch, sequence, config["joint_attention_dim"], generator=gen),
            torch.randn(batch, config["pooled_projection_dim"], generator=gen),
            torch.rand(batch, generator=gen) * 1000)


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[SD3Transformer2DModel, Any]]:
    """kind -> (ours, diffusers') sharing one random state dict."""
    built = {}
    for kind, config in CONFIGS.items():
        torch.manual_seed(0)
        ref = diffusers.SD3Transformer2DModel(**config).eval()
        state = random_state_dict(ref)
        ref.load_state_dict(state)
        built[kind] = (SD3Transformer2DModel.from_state_dict(config, state), ref)
    return built


@pytest.mark.parametrize("batch,height,width", CASES)
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_transformer_matches_diffusers(kind, batch, height, width, pairs):
    ours, ref = pairs[kind]
    args = inputs(CONFIGS[kind], batch, height, width)
    with torch.no_grad():
        expected = ref(*args, return_dict=False)[0]
        assert_close(ours(*args), expected)


def test_from_pretrained_reads_a_diffusers_transformer_folder(pairs, tmp_path):
    _, ref = pairs["sd35"]
    ref.save_pretrained(tmp_path / "transformer")
    ours = SD3Transformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    args = inputs(TINY_SD35, 1, 6, 10)
    with torch.no_grad():
        assert_close(ours(*args), ref(*args, return_dict=False)[0])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fresh_model_builds_diffusers_position_table(kind):
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(**CONFIGS[kind])
    ours = SD3Transformer2DModel(**CONFIGS[kind])
    torch.testing.assert_close(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("config", [SD3_MEDIUM, SD35_MEDIUM], ids=["sd3-medium", "sd3.5-medium"])
def test_real_config_builds_diffusers_state_dict_on_meta(config):
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**config)
        ours = SD3Transformer2DModel.from_config(config)
    expected = {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == expected
    assert ours.config["dual_attention_layers"] == config.get("dual_attention_layers", [])


@pytest.mark.parametrize("key,value", [
    ("qk_norm", "l2"),
    ("pos_embed_max_size", None),
    ("dual_attention_layers", [3]),
    ("caption_projection_dim", 24),
    ("patch_size", 0),
])
def test_unsupported_config_value_raises_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"`{key}`"):
        SD3Transformer2DModel(**{**TINY_SD3, key: value})


def test_latent_larger_than_the_position_table_is_refused(pairs):
    ours, _ = pairs["sd3"]
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours(*inputs(TINY_SD3, 1, 26, 8))


def test_multi_head_attention_lowering_switches_every_attention_and_keeps_outputs(pairs):
    ours, ref = pairs["sd35"]
    args = inputs(TINY_SD35, 2, 6, 10)
    with torch.no_grad():
        expected = ref(*args, return_dict=False)[0]
    lowered = SD3Transformer2DModel.from_state_dict(TINY_SD35, ours.state_dict())
    # One joint attention per block, plus the image-only `attn2` of the two dual-attention blocks.
    assert lower_to_multi_head_attention(lowered) == TINY_SD35["num_layers"] + 2
    with torch.no_grad():
        assert_close(lowered(*args), expected)


@pytest.mark.parametrize("fused", [False, True], ids=["sdpa", "multi_head_attention"])
def test_onnx_export_keeps_batch_size_and_sequence_dynamic(fused, pairs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from diffrt.export.attention_op import translation_table
    from diffrt.export.onnx import Positional

    model = SD3Transformer2DModel.from_state_dict(TINY_SD35, pairs["sd35"][0].state_dict())
    if fused:
        lower_to_multi_head_attention(model)
    dynamic = ({0: "batch", 2: "height", 3: "width"}, {0: "batch", 1: "sequence"}, {0: "batch"}, {0: "batch"})
    # Traced at sizes other than those checked; none is 1 (torch.export would specialise it).
    with torch.no_grad():
        program = torch.onnx.export(
            Positional(model, INPUT_NAMES).eval(), inputs(TINY_SD35, 2, 8, 12), dynamo=True, opset_version=23,
            input_names=INPUT_NAMES, output_names=["out_hidden_states"], dynamic_shapes={"inputs": dynamic},
            custom_translation_table=translation_table() if fused else None, verbose=False,
        )
    assert program is not None
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [tuple(i.shape) for i in session.get_inputs()] == [
        ("batch", 4, "height", "width"), ("batch", "sequence", 12), ("batch", 10), ("batch",)]
    ops = {node.op_type for node in program.model.graph}
    assert ("MultiHeadAttention" in ops) == fused
    for batch, height, width, sequence in [(1, 6, 10, 5), (3, 12, 8, 9), (1, 2, 2, 1)]:
        args = inputs(TINY_SD35, batch, height, width, sequence, seed=1)
        with torch.no_grad():
            expected = model(*args).numpy()
        (got,) = session.run(None, {name: value.numpy() for name, value in zip(INPUT_NAMES, args)})
        assert got.shape == expected.shape == (batch, 4, height, width)
        error = float(np.abs(got - expected).max())
        assert error <= 1e-4 * max(1.0, float(np.abs(expected).max())), (batch, height, width, sequence, error)


def test_rotary_embedding_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb as reference

    gen = torch.Generator().manual_seed(0)
    heads, length, dim = 3, 5, 8
    hidden = torch.randn(2, length, heads * dim, generator=gen)
    cos, sin = torch.randn(length, dim, generator=gen), torch.randn(length, dim, generator=gen)
    expected = reference(hidden.unflatten(-1, (heads, dim)), (cos, sin), sequence_dim=1).flatten(2)
    torch.testing.assert_close(apply_rotary_emb(hidden, cos, sin, heads), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pre_only", [False, True], ids=["double-stream", "single-stream"])
def test_joint_attention_covers_flux_attention(pre_only):
    """The FLUX layout (context first, RMS q/k norm, rotary over the joint sequence; pre_only: no output
    projection and no context) against diffusers' FluxAttention, with one state dict."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    heads, dim_head, dim = 2, 8, 16
    context_dim = None if pre_only else dim
    torch.manual_seed(0)
    ref = FluxAttention(dim, heads, dim_head, bias=True, added_kv_proj_dim=context_dim, eps=1e-6,
                        context_pre_only=None if pre_only else False, pre_only=pre_only).eval()
    ours = JointAttention(dim, heads, dim_head, context_dim=context_dim, qk_norm="rms_norm", pre_only=pre_only,
                          context_first=True)
    state = random_state_dict(ref)
    ref.load_state_dict(state)
    ours.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(1)
    image, text = torch.randn(2, 6, dim, generator=gen), torch.randn(2, 4, dim, generator=gen)
    total = 6 if pre_only else 10
    rotary = (torch.randn(total, dim_head, generator=gen), torch.randn(total, dim_head, generator=gen))
    with torch.no_grad():
        if pre_only:
            hidden, context = ours(image, rotary_emb=rotary)
            assert context is None
            assert_close(hidden, ref(image, image_rotary_emb=rotary))
        else:
            hidden, context = ours(image, text, rotary_emb=rotary)
            expected_hidden, expected_context = ref(image, text, image_rotary_emb=rotary)
            assert_close(hidden, expected_hidden)
            assert context is not None
            assert_close(context, expected_context)
