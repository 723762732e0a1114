"""The digits model: configs of its diffusers / transformers components, sized to train on one CPU core.

32x32 RGB -> AutoencoderKL (3 blocks, factor 4) -> 8x8x4 latents; a two-level UNet2DConditionModel with
cross-attention at both levels; a 2-layer CLIPTextModel (hidden 32) over a locally trained CLIP BPE tokenizer.
The noise schedule is Stable Diffusion's (scaled_linear 0.00085..0.012, 1,000 steps, epsilon), so SD's
Align-Your-Steps schedules apply unchanged.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from digits.data import SIZE

TEXT_HIDDEN = 32
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[16, 32, 32],
)
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act="quick_gelu",
)
# Training uses DDPM's forward process; the package ships Euler (trailing spacing: the first step starts from pure
# noise at t=999, which is what a few-step sampler needs).
NOISE_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False,
)
EULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
)


def make_tokenizer(workdir: Path):
    """A transformers CLIPTokenizer on BPE files trained locally (`diffrt.bench.tokenizer_files`)."""
    from transformers import CLIPTokenizer

    from diffrt.bench.tokenizer_files import write_clip_tokenizer_files

    vocab_file, merges_file = write_clip_tokenizer_files(workdir / "bpe")
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    return CLIPTextModel(config)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)
