"""Our export ControlNet and the UNet's residual inputs against diffusers, on the same tiny random weights.

Oracle: diffusers' ControlNetModel (conditioning_scale 1.0: our module returns unscaled residuals) and
UNet2DConditionModel with `down_block_additional_residuals` / `mid_block_additional_residual`. Tolerance as in
test_export_models: 1e-5 relative to the output scale.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_export_models import assert_close, shapes, unet_inputs  # noqa: E402

from diffrt.errors import ConfigError, ExportError  # noqa: E402
from diffrt.export.models import ControlNetModel, UNet2DConditionModel  # noqa: E402

CASES = [(1, 8, 8), (2, 9, 7)]  # (batch, latent height, latent width); 9x7 is not a multiple of the down factor


def _controlnet_call(config, batch: int, height: int, width: int):
    args, ours, theirs = unet_inputs(config, batch, height, width)
    image = torch.rand(batch, 3, 8 * height, 8 * width, generator=torch.Generator().manual_seed(1))
    return args, image, ours, theirs


@pytest.mark.parametrize("kind", ["cn_sd15", "cn_sdxl"])
def test_controlnet_matches_diffusers(kind, tiny_controlnet):
    folder = tiny_controlnet(kind)
    ref = diffusers.ControlNetModel.from_pretrained(folder).eval()
    ours = ControlNetModel.from_pretrained(folder)
    assert shapes(ours) == shapes(ref)
    for batch, height, width in CASES:
        args, image, our_kwargs, their_kwargs = _controlnet_call(ref.config, batch, height, width)
        with torch.no_grad():
            down, mid = ref(*args, controlnet_cond=image, return_dict=False, **their_kwargs)
            got = ours(*args, image, **our_kwargs)
        assert len(got) == len(down) + 1 == len(ours.residual_channels())
        for mine, theirs, width_ in zip(got, [*down, mid], ours.residual_channels()):
            assert mine.shape[1] == width_
            assert theirs.abs().max() > 0  # the fixture's zero convolutions are randomised
            assert_close(mine, theirs)


def test_bgr_channel_order_flips_the_conditioning_image(tiny_controlnet):
    folder = tiny_controlnet("cn_sd15")
    ref = diffusers.ControlNetModel.from_pretrained(folder, controlnet_conditioning_channel_order="bgr").eval()
    ours = ControlNetModel.from_pretrained(folder)
    ours._controlnet_config["controlnet_conditioning_channel_order"] = "bgr"
    args, image, _, _ = _controlnet_call(ref.config, 1, 8, 8)
    with torch.no_grad():
        _, mid = ref(*args, controlnet_cond=image, return_dict=False)
        assert_close(ours(*args, image)[-1], mid)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_adds_controlnet_residuals_as_diffusers(kind, tiny_checkpoint):
    folder = tiny_checkpoint(kind)
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    ours = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    args, our_kwargs, their_kwargs = unet_inputs(ref.config, 2, 9, 7)
    with torch.no_grad():
        skips = ours_skips(ours, args, our_kwargs)
    gen = torch.Generator().manual_seed(2)
    down = [torch.randn(skip.shape, generator=gen) for skip in skips[:-1]]
    mid = torch.randn(skips[-1].shape, generator=gen)
    with torch.no_grad():
        expected = ref(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                       **their_kwargs).sample
        got = ours(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid, **our_kwargs)
        plain = ours(*args, **our_kwargs)
    assert_close(got, expected)
    assert (got - plain).abs().max() > 1e-3  # the residuals changed the prediction


def ours_skips(unet: UNet2DConditionModel, args, kwargs) -> list[torch.Tensor]:
    """The skip connections and the mid-block output of `unet` (the shapes its residual inputs take)."""
    sample, timestep, context = args
    emb = unet._embed_time(sample, timestep, kwargs.get("text_embeds"), kwargs.get("time_ids"), None)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    for block in unet.down_blocks:
        hidden, states = block(hidden, emb, context)
        skips.extend(states)
    assert unet.mid_block is not None
    return [*skips, unet.mid_block(hidden, emb, context)]


def test_controlnet_config_errors_name_the_key(tiny_controlnet):
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order"):
        ControlNetModel(controlnet_conditioning_channel_order="rbg")
    with pytest.raises(ConfigError, match="layers_per_block"):
        ControlNetModel(layers_per_block=[1, 2, 2, 2])
    with pytest.raises(ConfigError, match="class_embed_type"):
        ControlNetModel(class_embed_type="timestep")


def test_controlnet_weights_load_strictly(tiny_controlnet, tmp_path):
    folder = tiny_controlnet("cn_sd15")
    config = ControlNetModel.from_pretrained(folder).config
    with pytest.raises(ExportError, match="ControlNetModel weights do not match"):
        ControlNetModel.from_state_dict({**config, "conditioning_channels": 1},
                                        ControlNetModel.from_pretrained(folder).state_dict())


@pytest.mark.parametrize("kind, base", [("cn_sd15", "sd15"), ("cn_sdxl", "sdxl")])
def test_original_layout_file_converts_to_the_same_controlnet(kind, base, tiny_controlnet, tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    """lllyasviel's single-file layout -> a diffusers folder that diffusers loads into the same weights and config."""
    import json

    from safetensors.torch import save_file
    from single_file_writer import controlnet_to_original

    from diffrt.export.controlnet import resolve_controlnets

    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path / "cache"))
    folder = tiny_controlnet(kind)
    ref = diffusers.ControlNetModel.from_pretrained(folder)
    original = controlnet_to_original(ref.state_dict(), dict(ref.config))
    file = tmp_path / "control_v11p_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(file))
    unet_config = json.loads((tiny_checkpoint(base) / "unet" / "config.json").read_text())
    (source,) = resolve_controlnets([file], unet_config=unet_config)
    assert source.name == "control_v11p_tiny" and source.kind == "single_file"
    converted = diffusers.ControlNetModel.from_pretrained(source.path)
    for key in ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                "conditioning_embedding_out_channels", "use_linear_projection", "transformer_layers_per_block",
                "addition_embed_type", "projection_class_embeddings_input_dim", "down_block_types"):
        assert converted.config[key] == ref.config[key], key
    expected = ref.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in converted.state_dict().items())
    assert set(source.manifest()["weights_sha256"]) == {file.name}
    assert resolve_controlnets([file], unet_config=unet_config)[0].path == source.path  # converted once
