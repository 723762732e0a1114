"""Model families of original-layout checkpoints and the diffusers configs built for them.

A family (SD 1.x, SD 2.x, SDXL base, SDXL refiner) is recognised by its text-encoder key prefix; inpainting by a
9-channel UNet input. Configs start from the family's published diffusers configs, take every value the weights
determine from the key shapes (so tiny checkpoints convert too), then `original_config` and `config_overrides`.
Prediction type cannot be read from weights: SD 2.x defaults to v-prediction like diffusers, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffrt.errors import ConfigError
from diffrt.export.single_file_text import CLIP_STRUCTURE_KEYS, infer_clip_config
from diffrt.export.single_file_unet import Plan, Shapes, infer_unet_structure, infer_vae_structure, take_shape
from diffrt.package.files import read_json
from diffrt.package.names import INDEX_NAME, SCHEDULER_CONFIG

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSpec:
    component: str  # text_encoder | text_encoder_2
    prefix: str  # key prefix in the single file
    layout: str  # clip | open_clip
    with_projection: bool
    hidden_act: str

    @property
    def tokenizer(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class Family:
    name: str
    texts: tuple[TextSpec, ...]
    pipelines: tuple[str, str | None]  # (text-to-image, inpainting)
    base_repos: tuple[str, str | None]  # Hub repos whose tokenizers the family uses
    heads_per_level: int | None  # SD 1.x: 8 heads everywhere; None: 64-wide heads (channels // 64)
    scheduler: dict[str, Any]
    image_size: int
    vae_scaling_factor: float
    time_ids: int | None = None  # SDXL: size/crop (6) or size/crop/aesthetic score (5) conditioning values
    clip_skip: int = 0  # layers after the one the original model reads (SD 2.x: "penultimate")
    unet: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)


_LDM_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_SD_SCHEDULER = {
    **_LDM_BETAS, "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "prediction_type": "epsilon",
}
_XL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", **_LDM_BETAS, "interpolation_type": "linear", "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False, "prediction_type": "epsilon",
}
_SD_INDEX = {"requires_safety_checker": False, "safety_checker": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None]}
_XL_INDEX = {"feature_extractor": [None, None], "image_encoder": [None, None]}
_CLIP_L = TextSpec("text_encoder", "cond_stage_model.transformer.", "clip", False, "quick_gelu")

FAMILIES: dict[str, Family] = {
    "v1": Family(
        "v1", (_CLIP_L,), ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-inpainting"),
        8, {"_class_name": "PNDMScheduler", **_SD_SCHEDULER}, 512, 0.18215, index=_SD_INDEX,
    ),
    "v2": Family(
        "v2", (TextSpec("text_encoder", "cond_stage_model.model.", "open_clip", False, "gelu"),),
        ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
        ("stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-inpainting"),
        None, {"_class_name": "DDIMScheduler", **_SD_SCHEDULER, "prediction_type": "v_prediction"}, 768, 0.18215,
        clip_skip=1, unet={"upcast_attention": True}, index=_SD_INDEX,
    ),
    "xl_base": Family(
        "xl_base",
        (TextSpec("text_encoder", "conditioner.embedders.0.transformer.", "clip", False, "quick_gelu"),
         TextSpec("text_encoder_2", "conditioner.embedders.1.model.", "open_clip", True, "gelu")),
        ("StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-xl-base-1.0"),
        None, _XL_SCHEDULER, 1024, 0.13025, time_ids=6, index={**_XL_INDEX, "force_zeros_for_empty_prompt": True},
    ),
    "xl_refiner": Family(
        "xl_refiner", (TextSpec("text_encoder_2", "conditioner.embedders.0.model.", "open_clip", True, "gelu"),),
        ("StableDiffusionXLImg2ImgPipeline", None), ("stabilityai/stable-diffusion-xl-refiner-1.0", None),
        None, _XL_SCHEDULER, 1024, 0.13025, time_ids=5,
        index={**_XL_INDEX, "text_encoder": [None, None], "tokenizer": [None, None],
               "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False},
    ),
}
# diffusers' names for (family, inpainting)
MODEL_TYPES = {("v1", False): "v1", ("v1", True): "inpainting", ("v2", False): "v2", ("v2", True): "inpainting_v2",
               ("xl_base", False): "xl_base", ("xl_base", True): "xl_inpaint", ("xl_refiner", False): "xl_refiner"}

UNET_BASE: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": None,
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": None, "attention_type": "default",
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_norm": None, "downsample_padding": 1, "dropout": 0.0,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "reverse_transformer_layers_per_block": None, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None, "time_embedding_type": "positional",
    "timestep_post_act": None, "upcast_attention": False,
}
VAE_BASE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "force_upcast": True, "latents_mean": None,
    "latents_std": None, "norm_num_groups": 32, "shift_factor": None,
}
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler")
CONFIG_FILES = {"scheduler": SCHEDULER_CONFIG.name}  # the others are config.json


def unet_config(family: Family, structure: dict[str, Any], vae_levels: int, pooled_dim: int | None) -> dict:
    """UNet config from the family defaults and the weight-determined `structure`."""
    config = {**UNET_BASE, **family.unet, **structure}
    channels = structure["block_out_channels"]
    if family.heads_per_level is not None:
        config["attention_head_dim"] = family.heads_per_level
    elif all(c % 64 == 0 for c in channels):
        config["attention_head_dim"] = [c // 64 for c in channels]
    else:  # tiny test models: only an override or config folder can say
        config["attention_head_dim"] = None
    config["sample_size"] = family.image_size // 2 ** (vae_levels - 1)
    if family.time_ids is not None and pooled_dim is not None:
        extra = structure.get("projection_class_embeddings_input_dim", 0) - pooled_dim
        config["addition_embed_type"] = "text_time"
        config["addition_time_embed_dim"] = extra // family.time_ids if extra % family.time_ids == 0 else None
    return config


def vae_config(family: Family, structure: dict[str, Any]) -> dict[str, Any]:
    return {**VAE_BASE, **structure, "sample_size": family.image_size, "scaling_factor": family.vae_scaling_factor}


def scheduler_config(family: Family, inpainting: bool, warn: bool = True) -> dict[str, Any]:
    config = dict(family.scheduler)
    if family.name == "v2":
        if inpainting:  # stable-diffusion-2-inpainting is an epsilon model
            config["prediction_type"] = "epsilon"
        elif warn:
            logger.warning("SD 2.x prediction type cannot be read from weights: assuming v_prediction (the 768 "
                           "models); pass prediction_type='epsilon' for 512-base checkpoints")
    return config


def overrides_from_original_config(original: dict[str, Any], channels: list[int]) -> dict[str, dict[str, Any]]:
    """The few facts an LDM / SGM yaml config (parsed) adds to the weights: heads, parameterisation, schedule."""
    if not isinstance(original, dict) or not isinstance(original.get("model"), dict):
        raise ConfigError("`original_config` must be the parsed LDM yaml: a dict with `model.params`; got "
                          f"{type(original).__name__} without it")
    params = original["model"].get("params", {})
    network = (params.get("unet_config") or params.get("network_config") or {}).get("params", {})
    out: dict[str, dict[str, Any]] = {"unet": {}, "vae": {}, "scheduler": {}}
    heads, head_channels = network.get("num_heads", -1), network.get("num_head_channels", -1)
    if heads and heads > 0:
        out["unet"]["attention_head_dim"] = heads
    elif head_channels and head_channels > 0:
        out["unet"]["attention_head_dim"] = [c // head_channels for c in channels]
    if "scale_factor" in params:
        out["vae"]["scaling_factor"] = params["scale_factor"]
    if params.get("parameterization") == "v":
        out["scheduler"]["prediction_type"] = "v_prediction"
    for ldm, diffusers in (("linear_start", "beta_start"), ("linear_end", "beta_end"),
                           ("timesteps", "num_train_timesteps")):
        if ldm in params:
            out["scheduler"][diffusers] = params[ldm]
    return out


def model_index(family: Family, pipeline: str) -> dict[str, Any]:
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": "0.30.0", **family.index}
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", family.scheduler["_class_name"]]
    for spec in family.texts:
        cls = "CLIPTextModelWithProjection" if spec.with_projection else "CLIPTextModel"
        index[spec.component] = ["transformers", cls]
        index[spec.tokenizer] = ["transformers", "CLIPTokenizer"]
    return index


@dataclass
class ConfigOptions:
    """How a single file's configs are chosen (see `plan_single_file`)."""

    config_folder: Path | None
    overrides: dict[str, dict[str, Any]]
    original_config: dict[str, Any] | None
    prediction_type: str | None


def _mapped_shapes(shapes: Shapes, plan: Plan, prefix: str) -> Shapes:
    return {dst: take_shape(shapes[prefix + take.key], take.op, take.rows) for dst, take in plan.items()}


def build_configs(shapes: Shapes, family: Family, inpainting: bool, plans: dict[str, Plan], prefixes: dict[str, str],
                  options: ConfigOptions) -> tuple[dict[str, dict], int, str]:
    """Each component's config, the text encoders' clip_skip and the pipeline class."""
    strip = {name: {k[len(p):]: s for k, s in shapes.items() if k.startswith(p)} for name, p in prefixes.items()}
    unet_structure = infer_unet_structure(strip["unet"])
    vae_structure = infer_vae_structure(strip["vae"])
    texts = {spec.component: infer_clip_config(_mapped_shapes(shapes, plans[spec.component], spec.prefix),
                                               spec.component, spec.with_projection, spec.hidden_act)
             for spec in family.texts}
    pooled = texts.get("text_encoder_2", {}).get("projection_dim")
    structures = {"unet": unet_structure, "vae": vae_structure, **texts}
    if options.config_folder is not None:
        configs, clip_skip, pipeline = _folder_configs(options.config_folder, structures, family)
    else:
        configs = {"unet": unet_config(family, unet_structure, len(vae_structure["block_out_channels"]), pooled),
                   "vae": vae_config(family, vae_structure), **texts}
        configs["scheduler"] = scheduler_config(family, inpainting, warn=not _sets_prediction(options))
        clip_skip, pipeline_class = family.clip_skip, family.pipelines[inpainting]
        assert pipeline_class is not None  # detect_family refuses a 9-channel UNet of a family without inpainting
        pipeline = pipeline_class
    updates = [options.overrides]
    if options.original_config is not None:
        updates.insert(0, overrides_from_original_config(options.original_config, unet_structure["block_out_channels"]))
    if options.prediction_type is not None:
        updates.append({"scheduler": {"prediction_type": options.prediction_type}})
    for update in updates:
        for name, values in update.items():
            if name in configs:
                configs[name].update(values)
    _check_complete(configs)
    return configs, clip_skip, pipeline


def _sets_prediction(options: ConfigOptions) -> bool:
    original = (options.original_config or {}).get("model", {}).get("params", {})
    return (options.prediction_type is not None or "prediction_type" in options.overrides.get("scheduler", {})
            or "parameterization" in original)


def _check_complete(configs: dict[str, dict]) -> None:
    """Values the weights could not give (tiny models) must come from an override or the config folder."""
    needed = [("unet", "attention_head_dim")] + [(n, "num_attention_heads") for n in configs if "text" in n]
    if configs["unet"].get("addition_embed_type") == "text_time":
        needed.append(("unet", "addition_time_embed_dim"))
    for name, key in needed:
        if configs[name].get(key) is None:
            raise ConfigError(f"cannot infer {name} `{key}` from the weights' shapes (tiny or unusual widths): "
                              f"pass config_overrides={{'{name}': {{'{key}': ...}}}} or a config_folder")


def _normalise(key: str, value: Any, structure: dict[str, Any]) -> Any:
    if key == "transformer_layers_per_block" and isinstance(value, int):
        return [value] * len(structure["block_out_channels"])
    return list(value) if isinstance(value, (list, tuple)) else value


def _folder_configs(folder: Path, structures: dict[str, dict], family: Family) -> tuple[dict[str, dict], int, str]:
    """Configs from `folder`, checked against the weights; the file's text-encoder depth wins (see clip_skip)."""
    configs, clip_skip = {}, 0
    texts = {spec.component: spec for spec in family.texts}
    for name in [*structures, "scheduler"]:
        path = folder / name / CONFIG_FILES.get(name, "config.json")
        configs[name] = read_json(path, required=True, error=ConfigError)
        checked: list[str] = list(structures.get(name, {}))
        if name in texts:  # a model without projection ignores `projection_dim`
            checked = [k for k in CLIP_STRUCTURE_KEYS if k != "projection_dim" or texts[name].with_projection]
        for key in checked:
            want, have = structures[name][key], configs[name].get(key)
            if have is not None and _normalise(key, have, structures[name]) != _normalise(key, want, structures[name]):
                raise ConfigError(f"{path}: `{key}` is {have!r} but the single file's weights need {want!r}")
    for spec in family.texts:
        layers = structures[spec.component]["num_hidden_layers"]
        folder_layers = configs[spec.component]["num_hidden_layers"]
        if layers < folder_layers:
            raise ConfigError(f"{folder / spec.component / 'config.json'}: `num_hidden_layers` is {folder_layers} but "
                              f"the single file has {layers} layers")
        clip_skip = max(clip_skip, layers - folder_layers)  # diffusers' SD 2.x folders drop OpenCLIP's last layer
        configs[spec.component]["num_hidden_layers"] = layers
    index = read_json(folder / INDEX_NAME, required=True, error=ConfigError)
    return configs, clip_skip, index.get("_class_name", family.pipelines[0])
