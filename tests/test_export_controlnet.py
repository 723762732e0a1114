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
