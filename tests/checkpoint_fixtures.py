"""Tiny random-weight diffusers checkpoints, built locally (no Hub access) once per test session.

Every kind the project supports has a builder: SD 1.x, SD 2.x (v-prediction), SDXL base, SDXL refiner, SD inpaint
and LCM, and the flow-matching transformer families SD3 / SD3.5 and FLUX.1 (dev, schnell). Shapes are realistic
where it matters (VAE factor 8, CLIP tokenizer with real BPE rules, SDXL text_time conditioning), sizes are tiny so
a whole pipeline runs in well under a second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from diffrt.bench.tokenizer_files import write_clip_tokenizer_files

SEED = 0
CLIP_HIDDEN = 32


def make_tokenizer(workdir: Path, pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer from locally written BPE files; SD 2.x / SDXL tokenizer_2 pad with "!"."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_tokenizer_files(workdir / "bpe")
    return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)


def make_text_encoder(tokenizer, with_projection: bool = False, hidden_act: str = "quick_gelu"):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEED)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=CLIP_HIDDEN,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(config).eval()
    # A fresh LayerNorm (weight 1, bias 0) makes every token's output average exactly 0 over its channels; trained
    # CLIP encoders do not, and prompt emphasis (which rescales the chunk to its original mean) needs a real mean.
    norm = next(m for name, m in model.named_modules() if name.endswith("final_layer_norm"))
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
        norm.bias.copy_(0.5 * torch.randn_like(norm.bias))
    return model


def make_vae(norm_num_groups: int = 8):
    """VAE with the real downsampling factor of 8 (four blocks), tiny channels."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        latent_channels=4,
        sample_size=64,
    ).eval()


def make_unet(**overrides):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, timestep_spacing="leading",
)


def build_sd15(folder: Path, workdir: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer(workdir)
    pipe = StableDiffusionPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer, unet=make_unet(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def build_sd15_cuda(folder: Path, workdir: Path) -> None:
    """SD 1.x shape with an even number of channels per GroupNorm group (4 in the UNet, 2-4 in the VAE), as every
    real SD model has (320/32, 128/32, ...): ONNX Runtime's fused CUDA GroupNorm (the cuda export target) runs only
    those, and the other tiny kinds have one channel per group."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer(workdir)
    pipe = StableDiffusionPipeline(
        vae=make_vae(norm_num_groups=4), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=make_unet(norm_num_groups=8), scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def build_sd2(folder: Path, workdir: Path) -> None:
    """SD 2.x shape: linear projections, per-block head dims, upcast attention, "!" padding, v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = make_tokenizer(workdir, pad_token="!")
    unet = make_unet(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    scheduler = DDIMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": "v_prediction"})
    pipe = StableDiffusionPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tokenizer, hidden_act="gelu"), tokenizer=tokenizer,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def _sdxl_unet(cross_attention_dim: int, time_ids: int):
    return make_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + CLIP_HIDDEN,
        cross_attention_dim=cross_attention_dim,
    )


SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
)


def build_sdxl(folder: Path, workdir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = make_tokenizer(workdir), make_tokenizer(workdir, pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=make_text_encoder(tokenizer_2, with_projection=True, hidden_act="gelu"),
        tokenizer_2=tokenizer_2, unet=_sdxl_unet(2 * CLIP_HIDDEN, time_ids=6),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )
    pipe.save_pretrained(folder)


def build_sdxl_refiner(folder: Path, workdir: Path) -> None:
    """Refiner shape: only the second text encoder, aesthetic-score conditioning (5 time ids)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    tokenizer_2 = make_tokenizer(workdir, pad_token="!")
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=make_vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=make_text_encoder(tokenizer_2, with_projection=True, hidden_act="gelu"),
        tokenizer_2=tokenizer_2, unet=_sdxl_unet(CLIP_HIDDEN, time_ids=5),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(folder)


def build_sd_inpaint(folder: Path, workdir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    tokenizer = make_tokenizer(workdir)
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionInpaintPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=make_unet(in_channels=9), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def build_lcm(folder: Path, workdir: Path) -> None:
    """LCM-distilled SD 1.x shape: guidance embedding through time_cond_proj_dim."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    tokenizer = make_tokenizer(workdir)
    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        original_inference_steps=50, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = LatentConsistencyModelPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer,
        unet=make_unet(time_cond_proj_dim=32), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def make_t5(workdir: Path):
    """A tiny T5 encoder and its fast tokenizer (a Unigram vocabulary of letters, built locally)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    torch.manual_seed(SEED)
    config = T5Config(vocab_size=len(vocab), d_model=CLIP_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval(), tokenizer


def make_flow_vae():
    """SD3 / FLUX's VAE layout (no quant convs, scaling and shift factors) at the tiny test size."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, latent_channels=4,
        sample_size=64, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def _sd3_pipeline(folder: Path, workdir: Path, **transformer_options) -> None:
    """SD3 shape: MMDiT transformer (patch 2, a cropped position table), two CLIP encoders with projection, T5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = make_tokenizer(workdir), make_tokenizer(workdir, pad_token="!")
    text_encoder_3, tokenizer_3 = make_t5(workdir)
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=CLIP_HIDDEN, joint_attention_dim=CLIP_HIDDEN,
        pooled_projection_dim=2 * CLIP_HIDDEN, pos_embed_max_size=16, **transformer_options,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=make_flow_vae(),
        text_encoder=make_text_encoder(tokenizer, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=make_text_encoder(tokenizer_2, with_projection=True), tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)


def build_sd3(folder: Path, workdir: Path) -> None:
    _sd3_pipeline(folder, workdir)


def build_sd35(folder: Path, workdir: Path) -> None:
    """SD3.5's transformer options: RMS qk-norm and a dual-attention (MMDiT-X) first block."""
    _sd3_pipeline(folder, workdir, qk_norm="rms_norm", dual_attention_layers=(0,))


def _flux_pipeline(folder: Path, workdir: Path, guidance_embeds: bool, scheduler_options: dict) -> None:
    """FLUX.1 shape: dual- and single-stream blocks over packed 2x2 latent patches, CLIP pooled + T5 tokens."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = make_tokenizer(workdir)
    text_encoder_2, tokenizer_2 = make_t5(workdir)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=CLIP_HIDDEN, pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=[4, 6, 6],
    )
    pipe = FluxPipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_options),
        vae=make_flow_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(folder)


def build_flux_dev(folder: Path, workdir: Path) -> None:
    """FLUX.1-dev: guidance embedded in the transformer, resolution-dependent schedule shift."""
    _flux_pipeline(folder, workdir, True, dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096))


def build_flux_schnell(folder: Path, workdir: Path) -> None:
    """FLUX.1-schnell: no guidance embedding, unshifted schedule."""
    _flux_pipeline(folder, workdir, False, dict(shift=1.0, use_dynamic_shifting=False))


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "sd15": build_sd15,
    "sd2": build_sd2,
    "sdxl": build_sdxl,
    "sdxl_refiner": build_sdxl_refiner,
    "sd_inpaint": build_sd_inpaint,
    "lcm": build_lcm,
    "sd15_cuda": build_sd15_cuda,
    "sd3": build_sd3,
    "sd35": build_sd35,
    "flux_dev": build_flux_dev,
    "flux_schnell": build_flux_schnell,
}
# Kinds built on demand only, not part of `any_tiny_checkpoint`'s sweep over the UNet families (the transformer
# families have their own tests: tests/test_flow_pipelines.py).
EXTRA_KINDS = ("sd15_cuda", "sd3", "sd35", "flux_dev", "flux_schnell")


def build_checkpoint(kind: str, root: Path) -> Path:
    """Build (or reuse) the tiny diffusers checkpoint `kind` under `root`; returns its folder."""
    folder = root / kind
    if not (folder / "model_index.json").exists():
        BUILDERS[kind](folder, root / f"{kind}_work")
    return folder


@pytest.fixture(scope="session")
def checkpoints_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoints_root: Path) -> Callable[[str], Path]:
    """`tiny_checkpoint("sdxl")` -> folder of a diffusers-format checkpoint, built once per session."""
    return lambda kind: build_checkpoint(kind, checkpoints_root)


@pytest.fixture(scope="session", params=sorted(kind for kind in BUILDERS if kind not in EXTRA_KINDS))
def any_tiny_checkpoint(request: pytest.FixtureRequest, tiny_checkpoint) -> tuple[str, Path]:
    return request.param, tiny_checkpoint(request.param)


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, checkpoints_root: Path) -> Callable[[str], Path]:
    """`tiny_package("sdxl")` -> a model package exported (fp32, ONNX Runtime target) from the tiny checkpoint."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            from diffrt.export import export_pipeline

            output = checkpoints_root / f"{kind}_package"
            if not (output / "diffrt.json").exists():
                export_pipeline(tiny_checkpoint(kind), output)
            built[kind] = output
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_deep_cache_package(tiny_checkpoint, checkpoints_root: Path) -> Callable[[str], Path]:
    """`tiny_deep_cache_package("sd15")` -> the tiny checkpoint exported with DeepCache (branch 0), built once."""

    def get(kind: str) -> Path:
        output = checkpoints_root / f"{kind}_deep_cache_package"
        if not (output / "diffrt.json").exists():
            from diffrt.export import export_pipeline

            export_pipeline(tiny_checkpoint(kind), output, deep_cache=True)
        return output

    return get


# ControlNets for the tiny checkpoints: (base checkpoint kind, seed). Two per base so multi-ControlNet sums differ.
CONTROLNETS = {"cn_sd15": ("sd15", 1), "cn_sd15_b": ("sd15", 2), "cn_sdxl": ("sdxl", 3), "cn_sdxl_b": ("sdxl", 4)}


def build_controlnet(folder: Path, base: Path, seed: int) -> None:
    """A diffusers ControlNetModel shaped from the base checkpoint's UNet (as `ControlNetModel.from_unet` does, the
    way real ControlNets are trained), with every weight random: the zero convolutions of a fresh ControlNet would
    make its residuals 0 and every parity test pass trivially."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                parameter.copy_(0.2 * torch.randn_like(parameter))
    controlnet.eval().save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_checkpoint, checkpoints_root: Path) -> Callable[[str], Path]:
    """`tiny_controlnet("cn_sd15")` -> folder of a diffusers ControlNetModel for that tiny base, built once."""

    def get(kind: str) -> Path:
        base, seed = CONTROLNETS[kind]
        folder = checkpoints_root / kind
        if not (folder / "config.json").exists():
            build_controlnet(folder, tiny_checkpoint(base), seed)
        return folder

    return get


# base kind -> its ControlNets, exported into one package per base (named pose and depth in the package)
CONTROLNET_PACKAGES = {"sd15": ("cn_sd15", "cn_sd15_b"), "sdxl": ("cn_sdxl", "cn_sdxl_b")}
CONTROLNET_NAMES = ("pose", "depth")


@pytest.fixture(scope="session")
def tiny_controlnet_package(tiny_checkpoint, tiny_controlnet, checkpoints_root: Path) -> Callable[[str], Path]:
    """`tiny_controlnet_package("sd15")` -> a package of the tiny base with ControlNets `pose` and `depth`."""

    def get(kind: str) -> Path:
        output = checkpoints_root / f"{kind}_controlnet_package"
        if not (output / "diffrt.json").exists():
            from diffrt.export import export_pipeline

            specs = [f"{name}={tiny_controlnet(cn)}" for name, cn in zip(CONTROLNET_NAMES, CONTROLNET_PACKAGES[kind])]
            export_pipeline(tiny_checkpoint(kind), output, controlnets=specs)
        return output

    return get
