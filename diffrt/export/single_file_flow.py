"""Single files of the flow-matching transformer families: SD3 / SD3.5 and FLUX.1.

What a file holds varies: Stability's SD3 files carry the MMDiT (`model.diffusion_model.`), the VAE
(`first_stage_model.`, 16 latent channels, no quant convs) and, in the `_incl_clips` / `_t5xxl` releases, the text
encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` (already in transformers' layout); SD3.5 files
ship without text encoders; BFL's FLUX.1 files are the transformer alone (ComfyUI's all-in-one saves add the VAE
and `text_encoders.{clip_l,t5xxl}`). So `plan_flow` maps what the file has, and takes every other component the
pipeline needs, whole, from `config_folder` (a diffusers folder of the same family: its config and weights,
linked into the converted folder). A component nobody supplies is an ExportError naming it before anything is
written; only SD3's T5 may be left out (the runtime then runs as Diffusers with `text_encoder_3=None`).

Configs: from the weights' shapes plus the family's published conventions, or, where `config_folder` has the
component, its config checked against the shapes (a FLUX.1-dev folder serves a schnell file: only
`guidance_embeds` and the schedule differ, and those follow the file).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffrt.errors import ConfigError, ExportError
from diffrt.export.single_file_config import CONFIG_FILES, VAE_BASE, ConfigOptions, Family
from diffrt.export.single_file_flux import (
    AXES_DIMS_ROPE,
    flux_hidden,
    flux_transformer_plan,
    infer_flux_transformer,
)
from diffrt.export.single_file_flux import DETECT_KEY as FLUX_KEY
from diffrt.export.single_file_sd3 import DETECT_KEY as SD3_KEY
from diffrt.export.single_file_sd3 import infer_sd3_transformer, sd3_transformer_plan
from diffrt.export.single_file_text import CLIP_STRUCTURE_KEYS, clip_plan, infer_clip_config
from diffrt.export.single_file_unet import Plan, Shapes, Take, infer_vae_structure, take_shape, vae_plan
from diffrt.package.files import read_json
from diffrt.package.names import CONFIG_NAME, INDEX_NAME

logger = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "text_encoders.{}.transformer."  # clip_l, clip_g, t5xxl
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULERS = {  # FLUX.1-dev's resolution-dependent shift; schnell's unshifted few-step schedule
    True: {**FLOW_SCHEDULER, "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
           "max_shift": 1.15, "use_dynamic_shifting": True},
    False: {**FLOW_SCHEDULER, "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
            "max_shift": 1.15, "shift": 1.0, "use_dynamic_shifting": False},
}
CLIP_TOKENIZER = ["transformers", "CLIPTokenizer"]
T5_TOKENIZER = ["transformers", "T5TokenizerFast"]
# T5 v1.1 (SD3's and FLUX's T5-XXL) as transformers saves it; sizes come from the shapes
T5_BASE: dict[str, Any] = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "decoder_start_token_id": 0, "dropout_rate": 0.1,
    "eos_token_id": 1, "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06,
    "pad_token_id": 0, "relative_attention_max_distance": 128, "tie_word_embeddings": False, "use_cache": True,
}
T5_STRUCTURE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers",
                     "relative_attention_num_buckets", "is_gated_act")
T5_LAYER = "encoder.block.0.layer."
DEFAULT_WEIGHTS = re.compile(r"^[^.]+(?:-\d{5}-of-\d{5})?\.safetensors$")


@dataclass(frozen=True)
class TextEncoder:
    component: str  # text_encoder | text_encoder_2 | text_encoder_3
    name: str  # in the file: text_encoders.<name>.transformer.
    kind: str  # clip | t5
    with_projection: bool = False
    hidden_act: str = "quick_gelu"

    @property
    def prefix(self) -> str:
        return TEXT_PREFIX.format(self.name)

    @property
    def tokenizer(self) -> str:
        return self.component.replace("text_encoder", "tokenizer")

    @property
    def index_entry(self) -> list[str]:
        if self.kind == "t5":
            return ["transformers", "T5EncoderModel"]
        return ["transformers", "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"]


@dataclass(frozen=True)
class FlowFamily:
    name: str  # sd3 | flux
    label: str  # for messages
    pipeline: str
    transformer_class: str
    texts: tuple[TextEncoder, ...]
    optional: tuple[str, ...]  # components the pipeline runs without
    vae_factors: tuple[float, float]  # (scaling_factor, shift_factor)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c for c in ("vae", *(t.component for t in self.texts)) if c not in self.optional)


FLOW_FAMILIES = {
    "sd3": FlowFamily(
        "sd3", "SD3 / SD3.5", "StableDiffusion3Pipeline", "SD3Transformer2DModel",
        (TextEncoder("text_encoder", "clip_l", "clip", True, "quick_gelu"),
         TextEncoder("text_encoder_2", "clip_g", "clip", True, "gelu"),
         TextEncoder("text_encoder_3", "t5xxl", "t5")),
        ("text_encoder_3",), (1.5305, 0.0609),
    ),
    "flux": FlowFamily(
        "flux", "FLUX.1", "FluxPipeline", "FluxTransformer2DModel",
        (TextEncoder("text_encoder", "clip_l", "clip", False, "quick_gelu"),
         TextEncoder("text_encoder_2", "t5xxl", "t5")),
        (), (0.3611, 0.1159),
    ),
}
BASE_REPOS = {  # model type -> the diffusers repo whose tokenizers (and layout) the family uses
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35_medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35_large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
}


@dataclass
class FlowPlan:
    """What `single_file.SingleFilePlan` needs beyond the UNet families' table."""

    family: Family
    model_type: str
    plans: dict[str, Plan]
    prefixes: dict[str, str]
    configs: dict[str, dict]
    index: dict[str, Any]
    tokenizers: tuple[str, ...]
    tokenizer_repo: str
    borrowed: dict[str, Path] = field(default_factory=dict)  # component -> config_folder's folder, weights linked


def flow_family(shapes: Shapes) -> str | None:
    """"sd3" / "flux" when the file holds one of their transformers (with or without `model.diffusion_model.`)."""
    for name, key in (("sd3", SD3_KEY), ("flux", FLUX_KEY)):
        if key in shapes or TRANSFORMER_PREFIX + key in shapes:
            return name
    return None


def _strip(shapes: Shapes, prefix: str) -> Shapes:
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def _transformer_prefix(shapes: Shapes) -> str:
    return TRANSFORMER_PREFIX if any(k.startswith(TRANSFORMER_PREFIX) for k in shapes) else ""


def _transformer_shapes(shapes: Shapes, prefix: str) -> Shapes:
    if prefix:
        return _strip(shapes, prefix)
    # BFL's files: the transformer's keys at the top level (anything else of a known component is not its)
    return {k: s for k, s in shapes.items() if not k.startswith((VAE_PREFIX, "text_encoders."))}


def t5_plan(keys: list[str]) -> tuple[Plan, list[str]]:
    """T5EncoderModel keys are transformers' already; `encoder.embed_tokens` is tied to `shared`."""
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        if key == "encoder.embed_tokens.weight":
            if "shared.weight" not in keys:
                plan["shared.weight"] = Take(key)
        elif key == "shared.weight" or key.startswith("encoder."):
            plan[key] = Take(key)
        else:
            unknown.append(key)
    return plan, unknown


def _require(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ExportError(f"single-file {what} weights are incomplete: missing `{key}`")
    return shapes[key]


def infer_t5_config(shapes: Shapes, component: str) -> dict[str, Any]:
    """T5Config of a T5 encoder from its (transformers-named) shapes."""
    vocab, d_model = _require(shapes, "shared.weight", component)
    buckets, heads = _require(shapes, T5_LAYER + "0.SelfAttention.relative_attention_bias.weight", component)
    inner = _require(shapes, T5_LAYER + "0.SelfAttention.q.weight", component)[0]
    gated = T5_LAYER + "1.DenseReluDense.wi_0.weight" in shapes
    d_ff = _require(shapes, T5_LAYER + "1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", component)[0]
    layers = len({k.split(".")[2] for k in shapes if k.startswith("encoder.block.")})
    return {
        **T5_BASE, "vocab_size": vocab, "d_model": d_model, "d_kv": inner // heads, "d_ff": d_ff, "num_heads": heads,
        "num_layers": layers, "num_decoder_layers": layers, "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "dense_act_fn": "gelu_new" if gated else "relu",
        "is_gated_act": gated,
    }


def _text_plan(spec: TextEncoder, keys: list[str]) -> tuple[Plan, list[str]]:
    if spec.kind == "t5":
        return t5_plan(keys)
    plan, unknown = clip_plan([k for k in keys if k != "text_projection.weight"])
    if spec.with_projection:
        if "text_projection.weight" in keys:
            plan["text_projection.weight"] = Take("text_projection.weight")
        else:  # Stability's SD3 files: CLIP-L's pooled output is used unprojected (as diffusers loads them)
            plan["text_projection.weight"] = Take("text_model.embeddings.position_embedding.weight", "eye")
    elif "text_projection.weight" in keys:
        unknown.append("text_projection.weight")
    return plan, unknown


def _model_type(family: str, structure: dict[str, Any]) -> str:
    if family == "flux":
        if structure["out_channels"] is not None:
            raise ExportError(f"unsupported FLUX.1 transformer: {structure['in_channels']} input channels for "
                              f"{structure['out_channels']} output (FLUX.1 Fill / Depth); diffrt exports the "
                              "text-to-image FLUX.1 dev and schnell")
        return "flux-dev" if structure["guidance_embeds"] else "flux-schnell"
    if structure["qk_norm"] is None:
        return "sd3"
    return "sd35_medium" if structure["dual_attention_layers"] else "sd35_large"


def _same(key: str, have: Any, want: Any, structure: dict[str, Any], config: dict[str, Any]) -> bool:
    if key == "out_channels":  # None: as many as in_channels
        have = config.get("in_channels") if have is None else have
        want = structure.get("in_channels") if want is None else want
    if isinstance(have, (list, tuple)) or isinstance(want, (list, tuple)):
        return list(have or []) == list(want or [])
    return bool(have == want)


def _folder_config(folder: Path | None, name: str, structure: dict[str, Any], fallback: dict[str, Any],
                   follow_file: tuple[str, ...] = ()) -> dict[str, Any]:
    """The folder's config for `name` checked against the weights' `structure`, or `fallback` without one.
    Keys in `follow_file` may differ: the file's value wins."""
    path = None if folder is None else folder / name / CONFIG_FILES.get(name, CONFIG_NAME)
    if path is None or not path.is_file():
        return fallback
    config = read_json(path, required=True, error=ConfigError)
    for key, want in structure.items():
        if key in config and not _same(key, config[key], want, structure, config):
            if key in follow_file:
                logger.info("%s: `%s` is %r; the single file's weights need %r, which is used", path, key,
                            config[key], want)
                continue
            raise ConfigError(f"{path}: `{key}` is {config[key]!r} but the single file's weights need {want!r}")
    return {**config, **structure}


def default_weights(name: str) -> bool:
    """A diffusers / transformers weight file of no variant: `<base>[-00001-of-00002].safetensors` (as
    `checkpoint.WEIGHT_NAME` reads them: a variant is a second dot), or a sharded file's index."""
    return bool(DEFAULT_WEIGHTS.match(name)) or name.endswith(".safetensors.index.json") and name.count(".") == 3


def _has_weights(directory: Path) -> bool:
    return any(DEFAULT_WEIGHTS.match(p.name) for p in directory.glob("*.safetensors"))


def _folder_index(folder: Path, family: FlowFamily) -> dict[str, Any]:
    index = read_json(folder / INDEX_NAME, required=True, error=ConfigError)
    if index.get("_class_name") != family.pipeline:
        raise ConfigError(f"config_folder {folder} is a {index.get('_class_name')} checkpoint, but the single file "
                          f"holds a {family.label} transformer: pass a diffusers {family.pipeline} folder")
    return index


def _borrow(family: FlowFamily, missing: list[str], folder: Path | None, file_name: str,
            repo: str) -> tuple[dict[str, Path], list[str]]:
    """Components of `config_folder` that stand in for those the file lacks; ExportError for a required one that
    nobody supplies. Returns (borrowed, optional components left out)."""
    index = _folder_index(folder, family) if folder is not None else {}
    borrowed: dict[str, Path] = {}
    for name in missing:
        entry = index.get(name)
        directory = folder / name if folder is not None else None
        if directory is not None and isinstance(entry, list) and entry[:1] != [None] and directory.is_dir() \
                and (directory / CONFIG_NAME).is_file() and _has_weights(directory):
            borrowed[name] = directory
    lacking = [name for name in family.required if name in missing and name not in borrowed]
    if lacking:
        where = (f"{folder} has no {', '.join(lacking)} with .safetensors weights either" if folder is not None else
                 f"pass config_folder (`--config-folder`) a diffusers {family.pipeline} folder (e.g. a download "
                 f"of {repo}) to take them from")
        raise ExportError(f"{file_name} is a {family.label} single file without {', '.join(lacking)}: {where}")
    left_out = [name for name in missing if name not in borrowed]
    for name in left_out:
        logger.warning("%s has no %s%s: the package runs without it (as Diffusers with %s=None)", file_name, name,
                       "" if folder is None else f" and neither has {folder}", name)
    return borrowed, left_out


def plan_flow(shapes: Shapes, file_name: str, options: ConfigOptions) -> FlowPlan:
    """Map, configure and complete an SD3 / FLUX single file (see the module docstring)."""
    family = FLOW_FAMILIES[flow_family(shapes) or ""]
    if options.prediction_type is not None or options.original_config is not None:
        given = "prediction_type" if options.prediction_type is not None else "original_config"
        raise ConfigError(f"`{given}` applies to SD 1.x / 2.x / XL single files; {family.label} is a flow-matching "
                          "model whose configs come from the weights and config_folder")
    folder = options.config_folder
    prefixes = {"transformer": _transformer_prefix(shapes)}
    stripped = {"transformer": _transformer_shapes(shapes, prefixes["transformer"])}
    if any(k.startswith(VAE_PREFIX) for k in shapes):
        prefixes["vae"] = VAE_PREFIX
    for spec in family.texts:
        if any(k.startswith(spec.prefix) for k in shapes):
            prefixes[spec.component] = spec.prefix
    for name, prefix in prefixes.items():
        if name != "transformer":
            stripped[name] = _strip(shapes, prefix)
    plans, unknown = _plans(family, stripped)
    for name, rest in unknown.items():
        if rest:
            raise ExportError(f"{len(rest)} unrecognised {name} key(s) in the single file, e.g. "
                              f"{[prefixes[name] + k for k in rest[:3]]}: not a supported {family.label} layout")
    known = tuple(p for p in prefixes.values() if p) + ("text_encoders.",)
    if prefixes["transformer"]:
        others = [k for k in shapes if not k.startswith(known)]
        if others:
            logger.warning("ignoring %d key(s) outside the components, e.g. %s", len(others), others[:3])

    infer = infer_sd3_transformer if family.name == "sd3" else infer_flux_transformer
    structure, conventions = infer(stripped["transformer"])
    model_type = _model_type(family.name, structure)
    repo = BASE_REPOS[model_type]
    missing = [c for c in ("vae", *(t.component for t in family.texts)) if c not in plans]
    borrowed, left_out = _borrow(family, missing, folder, file_name, repo)

    configs = _configs(family, structure, conventions, stripped, plans, folder, borrowed)
    for name, values in options.overrides.items():
        if name in configs:
            configs[name].update(values)
    _check_complete(configs, family)
    _check_fit(configs, family)

    produced = [t for t in family.texts if t.component not in left_out]
    base = Family(family.name, (), (family.pipeline, None), (repo, None), None, configs["scheduler"], 1024,
                  family.vae_factors[0])
    index = _index(family, configs, produced, left_out, folder, borrowed)
    return FlowPlan(base, model_type, plans, prefixes, configs, index, tuple(t.tokenizer for t in produced), repo,
                    borrowed)


def _plans(family: FlowFamily, stripped: dict[str, Shapes]) -> tuple[dict[str, Plan], dict[str, list[str]]]:
    plans: dict[str, Plan] = {}
    unknown: dict[str, list[str]] = {}
    keys = {name: list(s) for name, s in stripped.items()}
    if family.name == "sd3":
        plans["transformer"], unknown["transformer"] = sd3_transformer_plan(keys["transformer"])
    else:
        hidden = flux_hidden(stripped["transformer"])
        plans["transformer"], unknown["transformer"] = flux_transformer_plan(keys["transformer"], hidden)
    if "vae" in keys:
        vae_keys = [k for k in keys["vae"] if not k.startswith("loss.")]  # a training-time discriminator
        levels = len({k.split(".")[2] for k in vae_keys if k.startswith("encoder.down.")})
        plans["vae"], unknown["vae"] = vae_plan(vae_keys, levels)
    for spec in family.texts:
        if spec.component in keys:
            plans[spec.component], unknown[spec.component] = _text_plan(spec, keys[spec.component])
    return plans, unknown


def _mapped(shapes: Shapes, plan: Plan) -> Shapes:
    return {dst: take_shape(shapes[take.key], take.op, take.rows) for dst, take in plan.items()}


def _configs(family: FlowFamily, structure: dict[str, Any], conventions: dict[str, Any],
             stripped: dict[str, Shapes], plans: dict[str, Plan], folder: Path | None,
             borrowed: dict[str, Path]) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    follow = ("guidance_embeds",) if family.name == "flux" else ()
    configs["transformer"] = _folder_config(
        folder, "transformer", structure,
        {"_class_name": family.transformer_class, **conventions, **structure}, follow)
    if "vae" in plans:
        vae = infer_vae_structure(stripped["vae"])
        scaling, shift = family.vae_factors
        fallback = {**VAE_BASE, **vae, "sample_size": 1024, "scaling_factor": scaling, "shift_factor": shift}
        configs["vae"] = _folder_config(folder, "vae", vae, fallback)
    for spec in family.texts:
        if spec.component not in plans:
            continue
        mapped = _mapped(stripped[spec.component], plans[spec.component])
        if spec.kind == "t5":
            inferred = infer_t5_config(mapped, spec.component)
            checked = {k: inferred[k] for k in T5_STRUCTURE_KEYS}
        else:
            inferred = infer_clip_config(mapped, spec.component, spec.with_projection, spec.hidden_act)
            keys = [*CLIP_STRUCTURE_KEYS, "num_hidden_layers"]
            checked = {k: inferred[k] for k in keys if k != "projection_dim" or spec.with_projection}
        configs[spec.component] = _folder_config(folder, spec.component, checked, inferred)
    for name, directory in borrowed.items():
        configs[name] = read_json(directory / CONFIG_NAME, required=True, error=ConfigError)
    guidance = structure.get("guidance_embeds")
    scheduler = FLOW_SCHEDULER if family.name == "sd3" else FLUX_SCHEDULERS[bool(guidance)]
    folder_scheduler = None if folder is None else folder / "scheduler" / CONFIG_FILES["scheduler"]
    folder_transformer = read_json(folder / "transformer" / CONFIG_NAME) if folder is not None else {}
    same_kind = family.name == "sd3" or folder_transformer.get("guidance_embeds", guidance) == guidance
    if folder_scheduler is not None and folder_scheduler.is_file() and same_kind:
        configs["scheduler"] = read_json(folder_scheduler, required=True, error=ConfigError)
    else:
        configs["scheduler"] = dict(scheduler)
    return configs


def _check_complete(configs: dict[str, dict], family: FlowFamily) -> None:
    """Values the weights could not give (tiny or unusual widths) must come from an override or config_folder."""
    needed = [("transformer", "attention_head_dim"), ("transformer", "num_attention_heads")]
    if family.name == "flux":
        needed.append(("transformer", "axes_dims_rope"))
    needed += [(t.component, "num_attention_heads") for t in family.texts
               if t.kind == "clip" and t.component in configs]
    for name, key in needed:
        if configs[name].get(key) is None:
            hint = f" (known for head width {list(AXES_DIMS_ROPE)})" if key == "axes_dims_rope" else ""
            raise ConfigError(f"cannot infer {name} `{key}` from the weights' shapes{hint}: pass "
                              f"config_overrides={{'{name}': {{'{key}': ...}}}} or a config_folder")


def _check_fit(configs: dict[str, dict], family: FlowFamily) -> None:
    """The transformer reads the VAE's latents: a borrowed VAE of another family would fail at run time."""
    transformer, vae = configs["transformer"], configs["vae"]
    patch = 4 if family.name == "flux" else 1  # FLUX packs 2x2 latent patches into channels
    if vae.get("latent_channels") is not None and vae["latent_channels"] * patch != transformer["in_channels"]:
        raise ConfigError(f"the VAE has {vae['latent_channels']} latent channels, but the {family.label} transformer "
                          f"reads {transformer['in_channels']} (expected {transformer['in_channels'] // patch})")


def _index(family: FlowFamily, configs: dict[str, dict], produced: list[TextEncoder], left_out: list[str],
           folder: Path | None, borrowed: dict[str, Path]) -> dict[str, Any]:
    index: dict[str, Any] = {
        "_class_name": family.pipeline, "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", family.transformer_class], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", configs["scheduler"].get("_class_name", FLOW_SCHEDULER["_class_name"])],
    }
    if family.name == "sd3":
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
    folder_index = read_json(folder / INDEX_NAME) if folder is not None else {}
    for spec in produced:
        index[spec.component] = spec.index_entry
        index[spec.tokenizer] = T5_TOKENIZER if spec.kind == "t5" else CLIP_TOKENIZER
        for name in (spec.tokenizer, *([spec.component] if spec.component in borrowed else [])):
            entry = folder_index.get(name)  # the folder's own classes (e.g. T5Tokenizer) for what comes from it
            if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None:
                index[name] = entry
    for name in left_out:
        index[name] = [None, None]
        index[name.replace("text_encoder", "tokenizer")] = [None, None]
    return index
