"""Our export UNet / VAEs against diffusers: identical state-dict names and shapes, same outputs on the same weights.

Oracle: the installed diffusers modules, fed the same weights and inputs. Tolerance: 1e-5 max abs difference,
relative to the output's largest magnitude when that exceeds 1 (float32 on CPU; both sides call the same SDPA).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers")

from diffrt.errors import ConfigError, ExportError, InputError  # noqa: E402
from diffrt.export.models import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    UNet2DConditionModel,
    VaeDecoderForExport,
    VaeEncoderForExport,
)
from diffrt.export.models.unet import UNET_DEFAULTS  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "model_configs"
REPOS = [
    "runwayml--stable-diffusion-v1-5",
    "stabilityai--stable-diffusion-2-1",
    "stabilityai--stable-diffusion-xl-base-1.0",
    "stabilityai--stable-diffusion-xl-refiner-1.0",
    "runwayml--stable-diffusion-inpainting",
]
KINDS = ["sd15", "sd2", "sdxl", "sdxl_refiner", "sd_inpaint", "lcm"]
# (batch, latent height, latent width); 9x7 is not a multiple of the tiny UNet's downsampling factor.
UNET_CASES = [(batch, height, width) for batch in (1, 2) for height, width in ((8, 8), (9, 7))]
# (batch, image height, image width) for the VAE, whose latents are 8x smaller.
VAE_CASES = [(batch, height, width) for batch in (1, 2) for height, width in ((64, 64), (48, 80))]
TOL = 1e-5


def assert_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = max(1.0, ref.abs().max().item())
    error = (ours - ref).abs().max().item()
    assert error <= tol * scale, f"max abs diff {error:.3g} exceeds {tol} x {scale:.3g}"


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def load_config(repo: str, component: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{repo}--{component}.json").read_text())


def unet_inputs(config: Any, batch: int, height: int, width: int, seed: int = 0) -> tuple[tuple, dict, dict]:
    """Random inputs for a diffusers-configured UNet: positional args, our kwargs, diffusers' kwargs."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], height, width, generator=gen)
    timestep = torch.tensor([999.0, 10.5, 500.0][:batch])
    cross_attention_dim = config["cross_attention_dim"]
    if isinstance(cross_attention_dim, (list, tuple)):  # per block, but every block attends to the same context
        cross_attention_dim = cross_attention_dim[0]
    context = torch.randn(batch, 77, cross_attention_dim, generator=gen)
    ours: dict[str, torch.Tensor] = {}
    theirs: dict[str, Any] = {}
    if config["addition_embed_type"] == "text_time":
        num_ids = 6 if config["projection_class_embeddings_input_dim"] % 6 == 0 else 5
        pooled_dim = config["projection_class_embeddings_input_dim"] - num_ids * config["addition_time_embed_dim"]
        text_embeds = torch.randn(batch, pooled_dim, generator=gen)
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0][:num_ids]] * batch)
        if num_ids == 5:
            time_ids[:, -1] = 6.0  # refiner: aesthetic score
        ours.update(text_embeds=text_embeds, time_ids=time_ids)
        theirs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    if config.get("time_cond_proj_dim"):  # (a ControlNet config has no such key)
        guidance = torch.randn(batch, config["time_cond_proj_dim"], generator=gen)
        ours["timestep_cond"] = theirs["timestep_cond"] = guidance
    return (sample, timestep, context), ours, theirs


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These models are tiny: a second intra-op thread only adds OpenMP spin-waiting (40x slower on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unets(tiny_checkpoint):
    """kind -> (diffusers UNet, our UNet), both loaded from the tiny checkpoint folder."""
    cache: dict[str, tuple[torch.nn.Module, UNet2DConditionModel]] = {}

    def get(kind: str):
        if kind not in cache:
            folder = tiny_checkpoint(kind)
            ref = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
            cache[kind] = ref, UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_unet_matches_diffusers_on_tiny_checkpoint(kind, unets):
    ref, ours = unets(kind)
    assert shapes(ours) == shapes(ref)
    for batch, height, width in UNET_CASES:
        args, our_kwargs, their_kwargs = unet_inputs(ref.config, batch, height, width)
        with torch.no_grad():
            expected = ref(*args, **their_kwargs).sample
            got = ours(*args, **our_kwargs)
        assert_close(got, expected)


def test_unet_broadcasts_a_scalar_timestep(unets):
    ref, ours = unets("sd15")
    (sample, _, context), _, _ = unet_inputs(ref.config, 2, 8, 8)
    with torch.no_grad():
        expected = ref(sample, torch.tensor(321.0), context).sample
        got = ours(sample, torch.tensor(321.0), context)
        per_sample = ours(sample, torch.tensor([321.0, 321.0]), context)
    assert_close(got, expected)
    torch.testing.assert_close(got, per_sample, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_vae_encode_decode_match_diffusers(kind, tiny_checkpoint):
    folder = tiny_checkpoint(kind)
    ref = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    ours = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    encoder, decoder = VaeEncoderForExport(ours), VaeDecoderForExport(ours)
    assert shapes(ours) == shapes(ref)
    gen = torch.Generator().manual_seed(1)
    for batch, height, width in VAE_CASES:
        image = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
        latent = torch.randn(batch, 4, height // 8, width // 8, generator=gen)
        with torch.no_grad():
            assert_close(encoder(image), ref.encode(image).latent_dist.parameters)
            assert_close(decoder(latent), ref.decode(latent).sample)
            assert_close(ours(image), ref(image).sample)


@pytest.mark.parametrize("repo", REPOS)
@pytest.mark.parametrize("component", ["unet", "vae"])
def test_real_config_builds_diffusers_state_dict_on_meta(repo, component):
    config = load_config(repo, component)
    ref_cls, our_cls = {
        "unet": (diffusers.UNet2DConditionModel, UNet2DConditionModel),
        "vae": (diffusers.AutoencoderKL, AutoencoderKL),
    }[component]
    with torch.device("meta"):
        ref, ours = ref_cls.from_config(config), our_cls.from_config(config)
    assert shapes(ours) == shapes(ref)
    assert all(value == ours.config[key] for key, value in config.items() if not key.startswith("_"))


@pytest.mark.parametrize("repo", REPOS)
def test_real_config_with_unsupported_value_raises_config_error(repo):
    unet_config = {**load_config(repo, "unet"), "class_embed_type": "timestep"}
    with pytest.raises(ConfigError, match=r"`class_embed_type` must be one of None; got 'timestep'"):
        UNet2DConditionModel.from_config(unet_config)
    vae_config = load_config(repo, "vae")
    vae_config["down_block_types"] = ["AttnDownEncoderBlock2D"] + vae_config["down_block_types"][1:]
    with pytest.raises(ConfigError, match=r"`down_block_types` must be a list of 'DownEncoderBlock2D'.*got"):
        AutoencoderKL.from_config(vae_config)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("num_class_embeds", 10, "one of None"),
        ("encoder_hid_dim", 768, "one of None"),
        ("encoder_hid_dim_type", "text_proj", "one of None"),
        ("addition_embed_type", "text", "one of None, 'text_time'"),
        ("time_embedding_type", "fourier", "one of 'positional'"),
        ("resnet_time_scale_shift", "scale_shift", "one of 'default'"),
        ("attention_type", "gated", "one of 'default'"),
        ("dual_cross_attention", True, "one of False, None"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'UNetMidBlock2DCrossAttn', 'UNetMidBlock2D', None"),
        ("down_block_types", ["AttnDownBlock2D"] * 4, "'DownBlock2D', 'CrossAttnDownBlock2D'"),
        ("up_block_types", ["AttnUpBlock2D"] * 4, "'UpBlock2D', 'CrossAttnUpBlock2D'"),
        ("act_fn", "tanh", "one of ['gelu', 'mish', 'relu', 'silu', 'swish']"),
        ("attention_head_dim", [8, 8], "one per block (4, as down_block_types)"),
        ("conv_in_kernel", 2, "an odd int"),
        ("norm_num_groups", None, "an int"),
    ],
)
def test_unsupported_unet_option_names_key_and_allowed_values(key, value, expected):
    config = {**load_config(REPOS[0], "unet"), key: value}
    with pytest.raises(ConfigError) as error:
        UNet2DConditionModel.from_config(config)
    assert str(error.value).startswith(f"`{key}` must be ")
    assert expected in str(error.value) and f"got {value!r}" in str(error.value)


def test_nested_transformer_depths_need_the_reverse_list():
    config = {**load_config(REPOS[0], "unet"), "transformer_layers_per_block": [1, 1, [1, 1], 1]}
    with pytest.raises(ConfigError, match="`reverse_transformer_layers_per_block` must be set when"):
        UNet2DConditionModel.from_config(config)


def test_text_time_without_its_dimensions_raises_config_error():
    config = load_config("stabilityai--stable-diffusion-xl-base-1.0", "unet")
    del config["projection_class_embeddings_input_dim"]
    with pytest.raises(ConfigError, match="`projection_class_embeddings_input_dim` must be an int"):
        UNet2DConditionModel.from_config(config)


def test_config_is_fully_resolved_and_metadata_ignored(caplog):
    with caplog.at_level(logging.WARNING), torch.device("meta"):
        unet = UNet2DConditionModel.from_config({**load_config(REPOS[2], "unet"), "not_a_diffusers_key": 1})
    assert set(unet.config) == set(UNET_DEFAULTS)
    assert unet.config["transformer_layers_per_block"] == [1, 2, 10]
    assert unet.config["conv_in_kernel"] == 3
    assert "not_a_diffusers_key" in caplog.text and "_class_name" not in caplog.text


def test_vae_properties_come_from_config():
    with torch.device("meta"):
        sdxl = AutoencoderKL.from_config(load_config("stabilityai--stable-diffusion-xl-base-1.0", "vae"))
        sd15 = AutoencoderKL.from_config(load_config("runwayml--stable-diffusion-v1-5", "vae"))
        shifted = {"shift_factor": 0.1159, "latents_mean": [0.1] * 4, "force_upcast": False}
        flux_like = AutoencoderKL.from_config(shifted)
    assert (sdxl.scaling_factor, sdxl.force_upcast, sdxl.shift_factor, sdxl.latents_mean) == (0.13025, True, None, None)
    assert sd15.scaling_factor == 0.18215 and sd15.latents_std is None
    assert flux_like.shift_factor == 0.1159 and flux_like.latents_mean == [0.1] * 4 and flux_like.force_upcast is False


TINY_UNET = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=32, transformer_layers_per_block=1,
)
EXTRA_OPTIONS = {
    # SSD-1B / Segmind-style: per-layer transformer depths, explicit up-path depths.
    "asymmetric_depths": dict(
        layers_per_block=2, transformer_layers_per_block=[1, [1, 2]],
        reverse_transformer_layers_per_block=[[2, 1, 1], 1],
    ),
    "no_mid_block": dict(mid_block_type=None),
    "resnet_mid_block_and_embedding_options": dict(
        mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1.5, center_input_sample=True,
        time_embedding_act_fn="silu", timestep_post_act="silu", time_embedding_dim=96, flip_sin_to_cos=False,
        freq_shift=1,
    ),
    "block_lists_and_kernels": dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=[32, 32],
        layers_per_block=[1, 2], only_cross_attention=[True, False], conv_in_kernel=1, conv_out_kernel=1,
        downsample_padding=0, norm_eps=1e-6,
    ),
}


@pytest.mark.parametrize("name", sorted(EXTRA_OPTIONS))
def test_less_common_supported_options_match_diffusers(name):
    config = {**TINY_UNET, **EXTRA_OPTIONS[name]}
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel(**config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    args, our_kwargs, their_kwargs = unet_inputs(ref.config, 2, 9, 7)
    with torch.no_grad():
        assert_close(ours(*args, **our_kwargs), ref(*args, **their_kwargs).sample)


def test_num_attention_heads_is_the_head_count():
    # diffusers refuses `num_attention_heads` (its `attention_head_dim` already means heads); we accept the right name.
    torch.manual_seed(0)
    by_old_name = UNet2DConditionModel(**TINY_UNET).eval()
    by_new_name = UNet2DConditionModel(**{**TINY_UNET, "num_attention_heads": (2, 4), "attention_head_dim": 99})
    by_new_name.load_state_dict(by_old_name.state_dict(), strict=True)
    args, _, _ = unet_inputs(by_old_name.config, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(by_new_name(*args), by_old_name(*args), rtol=0, atol=0)
    assert by_new_name.up_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 4


def test_sdxl_unet_without_text_embeds_raises_input_error(unets):
    _, ours = unets("sdxl")
    (sample, timestep, context), kwargs, _ = unet_inputs(ours.config, 1, 8, 8)
    with pytest.raises(InputError, match="`text_embeds` must be a tensor"):
        ours(sample, timestep, context, time_ids=kwargs["time_ids"])


class _SdpaDtypes(TorchFunctionMode):
    """Records the query dtype of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind, attention_dtype", [("sd15", torch.bfloat16), ("sd2", torch.float32)])
def test_reduced_precision_runs_and_upcasts_attention_only_when_configured(kind, attention_dtype, tiny_checkpoint):
    ours = UNet2DConditionModel.from_pretrained(tiny_checkpoint(kind), subfolder="unet")
    (sample, timestep, context), _, _ = unet_inputs(ours.config, 2, 8, 8)
    with torch.no_grad():
        reference = ours(sample, timestep, context)
        ours = ours.to(torch.bfloat16)
        with _SdpaDtypes() as recorder:
            got = ours(sample.bfloat16(), timestep, context.bfloat16())
    assert ours.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert recorder.dtypes and set(recorder.dtypes) == {attention_dtype}
    assert (got.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def _to_cuda_half(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _to_cuda_half(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cuda_half(item) for item in value)
    return value.cuda().half() if value.is_floating_point() and value.dim() > 1 else value.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd2", "sdxl"])
def test_unet_in_float16_on_cuda_is_as_accurate_as_diffusers(kind, unets):
    ref, ours = unets(kind)
    args, our_kwargs, their_kwargs = unet_inputs(ref.config, 2, 16, 16)
    with torch.no_grad():
        exact = ref(*args, **their_kwargs).sample
        ref_half = copy.deepcopy(ref).cuda().half()(*_to_cuda_half(args), **_to_cuda_half(their_kwargs)).sample
        ours_half = copy.deepcopy(ours).cuda().half()(*_to_cuda_half(args), **_to_cuda_half(our_kwargs))
    assert ours_half.dtype == torch.float16
    ref_error = (ref_half.float().cpu() - exact).abs().max().item()
    our_error = (ours_half.float().cpu() - exact).abs().max().item()
    assert our_error <= max(2 * ref_error, 1e-3 * exact.abs().max().item())


def test_sd15_shapes_on_meta_device():
    # 125 x 75 latents (1000 x 600 px) are not multiples of 8: each upsampler must follow its skip connection's size.
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_config(REPOS[0], "unet"))
        out = unet(torch.empty(2, 4, 125, 75), torch.empty(2), torch.empty(2, 77, 768))
        vae = AutoencoderKL.from_config(load_config(REPOS[0], "vae"))
        image = vae.decode(torch.empty(1, 4, 96, 64))
        moments = vae.encode(torch.empty(1, 3, 768, 512))
    assert out.shape == (2, 4, 125, 75) and out.is_meta
    assert image.shape == (1, 3, 768, 512) and moments.shape == (1, 8, 96, 64)


@pytest.fixture
def vae_folder(tiny_checkpoint, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A writable copy of the tiny VAE folder, with its state dict."""
    folder = tmp_path / "vae"
    shutil.copytree(tiny_checkpoint("sd15") / "vae", folder)
    from safetensors.torch import load_file

    return folder, load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        torch.testing.assert_close(loaded[key], tensor.to(dtype), rtol=0, atol=0)


def test_from_pretrained_reads_variant_and_casts(vae_folder):
    from safetensors.torch import save_file

    folder, state = vae_folder
    half = {key: tensor.half() for key, tensor in state.items()}
    save_file(half, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    vae = AutoencoderKL.from_pretrained(folder, variant="fp16", dtype=torch.float32)
    assert vae.dtype == torch.float32 and not vae.training
    _assert_loaded(vae, {key: tensor.float() for key, tensor in half.items()})
    assert AutoencoderKL.from_pretrained(folder, variant="fp16", dtype=torch.float16).dtype == torch.float16


def test_from_pretrained_falls_back_to_shards_then_bin(vae_folder):
    from safetensors.torch import save_file

    folder, state = vae_folder
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for name, shard_keys in shards.items():
        save_file({key: state[key] for key in shard_keys}, str(folder / name))
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    _assert_loaded(AutoencoderKL.from_pretrained(folder), state)
    index.unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    _assert_loaded(AutoencoderKL.from_pretrained(folder), state)


def test_from_pretrained_renames_legacy_vae_attention_keys(vae_folder):
    from safetensors.torch import save_file

    folder, state = vae_folder
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, tensor in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = tensor
    assert any(".proj_attn." in key for key in legacy)
    save_file(legacy, str(folder / "diffusion_pytorch_model.safetensors"))
    _assert_loaded(AutoencoderKL.from_pretrained(folder), state)


def test_from_pretrained_errors_name_the_problem(vae_folder, tmp_path):
    folder, state = vae_folder
    with pytest.raises(InputError, match="`folder` must be a diffusers model folder containing config.json"):
        AutoencoderKL.from_pretrained(tmp_path / "missing")
    with pytest.raises(InputError, match=r"`folder` must contain diffusion_pytorch_model\.bf16\.safetensors"):
        AutoencoderKL.from_pretrained(folder, variant="bf16")
    config = json.loads((folder / "config.json").read_text())
    config["layers_per_block"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="AutoencoderKL weights do not match its config"):
        AutoencoderKL.from_pretrained(folder)


TINY_TAESD = dict(
    encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
    num_encoder_blocks=(1, 2, 1, 1), num_decoder_blocks=(1, 1, 2, 1),
)


def test_autoencoder_tiny_matches_diffusers():
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(**TINY_TAESD).eval()
    ours = AutoencoderTiny.from_config(dict(ref.config))
    assert shapes(ours) == shapes(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(2)
    for batch, height, width in VAE_CASES:
        image = torch.rand(batch, 3, height, width, generator=gen) * 2 - 1
        latent = torch.randn(batch, 4, height // 8, width // 8, generator=gen) * 2
        with torch.no_grad():
            assert_close(VaeEncoderForExport(ours)(image), ref.encode(image).latents)
            assert_close(VaeDecoderForExport(ours)(latent), ref.decode(latent).sample)
    assert ours.config["block_out_channels"] == [16, 16, 16, 16] and ours.scaling_factor == 1.0


def test_autoencoder_tiny_rejects_mismatched_block_lists():
    with pytest.raises(ConfigError, match=r"`num_encoder_blocks` must be as long as encoder_block_out_channels \(4\)"):
        AutoencoderTiny(num_encoder_blocks=(1, 3, 3))
