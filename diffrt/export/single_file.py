"""Single-file checkpoints in the original Stability layout -> a materialized diffusers folder.

`materialize_single_file` reads the safetensors header, recognises the family from key names and shapes, maps
every tensor to its diffusers / transformers name, builds the configs, and writes a diffusers folder (weights,
configs, tokenizers, model_index.json) into a cache directory: first to a temporary folder beside it, then renamed
into place, so the rest of export treats it like any folder. The folder is keyed by the file's path, size and
modification time and by the conversion options, so a second call reuses it.

SD3 / SD3.5 and FLUX.1 files (a transformer under `joint_blocks` / `double_blocks`) go through
`single_file_flow`: they may lack the VAE or text encoders (FLUX.1 files are the transformer alone), which then
come, weights linked, from `config_folder`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffrt.errors import ConfigError, ExportError, invalid
from diffrt.export.single_file_config import (
    COMPONENTS,
    CONFIG_FILES,
    FAMILIES,
    MODEL_TYPES,
    ConfigOptions,
    Family,
    build_configs,
    model_index,
)
from diffrt.export.single_file_flow import default_weights, flow_family, plan_flow
from diffrt.export.single_file_text import clip_plan, open_clip_plan
from diffrt.export.single_file_unet import (
    Plan,
    Shapes,
    apply_take,
    unet_layers_per_block,
    unet_plan,
    vae_plan,
)
from diffrt.package.files import read_json, temp_folder, write_json
from diffrt.package.leftovers import remove_stale_temp
from diffrt.package.names import CONFIG_NAME, INDEX_NAME
from diffrt.runtime.hub import hub_snapshot

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECORD = "diffrt_source.json"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# DDPM schedule buffers (LDM), EMA copies, the SGM denoiser's sigma table: not weights of any component we build
IGNORED_KEYS = re.compile(r"^(betas|alphas_cumprod(_prev)?|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|"
                          r"logvar|lvlb_weights|model_ema\..+|denoiser\..+)$")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "transformer": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
                "text_encoder_2": "model.safetensors", "text_encoder_3": "model.safetensors"}


@dataclass(frozen=True)
class SingleFileResult:
    """A converted single file: the diffusers folder and what was recognised."""

    path: Path  # the materialized diffusers folder
    model_type: str  # diffusers' name: v1, v2, xl_base, xl_refiner, inpainting, inpainting_v2, xl_inpaint, sd3,
    # sd35_medium, sd35_large, flux-dev, flux-schnell
    pipeline_class: str
    clip_skip: int  # text-encoder layers after the one the model reads (SD 2.x files keep OpenCLIP's 24th)


@dataclass
class SingleFilePlan:
    """What a single file converts to, before anything is written: per-component key plans and configs."""

    file: Path | None  # None for `plan_from_shapes`
    family: Family
    inpainting: bool
    plans: dict[str, Plan]  # component -> {diffusers key: Take(original key without prefix, op)}
    prefixes: dict[str, str]  # component -> key prefix in the file
    configs: dict[str, dict] = field(default_factory=dict)  # component -> config.json content
    pipeline_class: str = ""
    clip_skip: int = 0
    # SD3 / FLUX files (`single_file_flow`), where what the file holds varies: set instead of the family table's
    flow_type: str = ""  # the model type
    index: dict[str, Any] | None = None  # model_index.json
    tokenizers: tuple[str, ...] | None = None  # tokenizer folders to copy
    borrowed: dict[str, Path] = field(default_factory=dict)  # component -> config_folder's folder, weights linked

    @property
    def model_type(self) -> str:
        return self.flow_type or MODEL_TYPES[self.family.name, self.inpainting]


def plan_single_file(
    file: str | Path,
    *,
    config_folder: str | Path | None = None,
    config_overrides: dict[str, dict[str, Any]] | None = None,
    original_config: dict[str, Any] | None = None,
    prediction_type: str | None = None,
) -> SingleFilePlan:
    """Recognise `file` and build its diffusers configs and key plans from the header alone (no tensor is read).

    `config_folder`: a diffusers folder whose configs (checked against the weights) and tokenizers to use, like
    diffusers' `from_single_file(config=...)`. `config_overrides`: {component: {key: value}} applied last.
    `original_config`: the parsed LDM / SGM yaml. `prediction_type`: the scheduler's (weights cannot tell).
    """
    file = Path(file).expanduser().resolve()
    return _plan(file, _check_options(file, config_folder, config_overrides, original_config, prediction_type))


def plan_from_shapes(shapes: dict[str, tuple[int, ...]], **options: Any) -> SingleFilePlan:
    """`plan_single_file` for a header given as {key: shape}: no file needed (e.g. real-size architectures)."""
    return _plan_shapes(dict(shapes), None, _check_options(None, **options))


def materialize_single_file(
    file: str | Path,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    config_folder: str | Path | None = None,
    config_overrides: dict[str, dict[str, Any]] | None = None,
    original_config: dict[str, Any] | None = None,
    prediction_type: str | None = None,
) -> SingleFileResult:
    """Convert `file` into a diffusers folder under `cache_dir` (default $DIFFRT_CACHE or ~/.cache/diffrt), or
    reuse the one made earlier. `token` is for the Hub tokenizer download; the rest as in `plan_single_file`."""
    file = Path(file).expanduser().resolve()
    options = _check_options(file, config_folder, config_overrides, original_config, prediction_type)
    target = _cache_root(cache_dir) / f"{file.stem}-{_cache_key(file, options)}"
    if not (target / RECORD).is_file():
        _write_folder(target, _plan(file, options), options, token)
    record = read_json(target / RECORD, required=True, error=ConfigError)
    return SingleFileResult(target, record["model_type"], record["pipeline_class"], int(record["clip_skip"]))


def _plan(file: Path, options: ConfigOptions) -> SingleFilePlan:
    return _plan_shapes(_read_shapes(file), file, options)


def _plan_shapes(shapes: Shapes, file: Path | None, options: ConfigOptions) -> SingleFilePlan:
    if flow_family(shapes) is not None:  # SD3 / FLUX: a transformer, and what else the file or config_folder has
        flow = plan_flow(shapes, file.name if file is not None else "the checkpoint", options)
        return SingleFilePlan(file, flow.family, False, flow.plans, flow.prefixes, flow.configs,
                              flow.family.pipelines[0], 0, flow.model_type, flow.index, flow.tokenizers, flow.borrowed)
    family, inpainting = detect_family(shapes)
    plan = SingleFilePlan(file, family, inpainting, *_plans(shapes, family))
    plan.configs, plan.clip_skip, plan.pipeline_class = build_configs(
        shapes, family, inpainting, plan.plans, plan.prefixes, options)
    return plan


def _check_options(file: Path | None, config_folder: str | Path | None = None, config_overrides: dict | None = None,
                   original_config: dict | None = None, prediction_type: str | None = None) -> ConfigOptions:
    if file is not None and not file.is_file():
        raise ExportError(f"single-file checkpoint not found: {file}")
    if file is not None and file.suffix != ".safetensors":
        raise invalid("source", "a .safetensors file (pickled .ckpt / .pt files can run code when loaded: convert "
                      "them with safetensors first)", str(file))
    overrides = config_overrides or {}
    if not isinstance(overrides, dict) or set(overrides) - set(COMPONENTS) or not all(
            isinstance(v, dict) for v in overrides.values()):
        raise invalid("config_overrides", f"a dict {{component: {{key: value}}}} with components from "
                      f"{list(COMPONENTS)}", config_overrides)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise invalid("prediction_type", f"one of {list(PREDICTION_TYPES)}", prediction_type)
    folder = None
    if config_folder is not None:
        folder = Path(config_folder).expanduser().resolve()
        if not (folder / INDEX_NAME).is_file():
            raise ExportError(f"config_folder has no {INDEX_NAME}: {folder / INDEX_NAME}")
    return ConfigOptions(folder, overrides, original_config, prediction_type)


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / "single_file"
    return Path(os.environ.get("DIFFRT_CACHE", "~/.cache/diffrt")).expanduser() / "single_file"


def _cache_key(file: Path, options: ConfigOptions) -> str:
    """What the folder depends on: the file (path, size, mtime), the options and the config folder's texts."""
    stat = file.stat()
    digest = hashlib.sha256(json.dumps(
        [FORMAT_VERSION, str(file), stat.st_size, stat.st_mtime_ns, options.overrides, options.original_config,
         options.prediction_type], sort_keys=True, default=str).encode())
    if options.config_folder is not None:
        digest.update(str(options.config_folder).encode())
        for path in sorted(options.config_folder.rglob("*")):
            if path.suffix in (".json", ".txt") and path.is_file():
                digest.update(path.relative_to(options.config_folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _read_shapes(file: Path) -> Shapes:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError for any header problem
        raise ExportError(f"cannot read {file} as safetensors: {error}") from error


def detect_family(shapes: Shapes) -> tuple[Family, bool]:
    """(family, inpainting) from key names: the text encoders' prefixes differ between SD 1.x, 2.x, XL and refiner."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ExportError("not a Stable Diffusion single-file checkpoint: no `model.diffusion_model.*` UNet keys (nor "
                          "SD3 `joint_blocks.*` / FLUX.1 `double_blocks.*` transformer keys)")
    for name in ("xl_base", "xl_refiner", "v2", "v1"):  # SDXL's embedders.0 is CLIP-L, so check XL first
        family = FAMILIES[name]
        if all(any(k.startswith(spec.prefix) for k in shapes) for spec in family.texts):
            break
    else:
        raise ExportError("no text encoder found in the single file: expected `cond_stage_model.*` (SD 1.x/2.x) or "
                          "`conditioner.embedders.*` (SDXL) keys")
    if conv_in[1] not in (4, 9) or (conv_in[1] == 9 and family.pipelines[1] is None):
        raise ExportError(f"unsupported UNet input: {conv_in[1]} channels for {name} (supported: 4, text-to-image; "
                          "9, inpainting for SD 1.x / 2.x / XL base)")
    return family, conv_in[1] == 9


def _plans(shapes: Shapes, family: Family) -> tuple[dict[str, Plan], dict[str, str]]:
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, **{s.component: s.prefix for s in family.texts}}
    keys = {name: [k[len(p):] for k in shapes if k.startswith(p)] for name, p in prefixes.items()}
    unet_shapes = {k: shapes[UNET_PREFIX + k] for k in keys["unet"]}
    vae_keys = [k for k in keys["vae"] if not k.startswith("loss.")]  # a training-time discriminator
    vae_levels = len({k.split(".")[2] for k in vae_keys if k.startswith("encoder.down.")})
    plans: dict[str, Plan] = {}
    unknown: dict[str, list[str]] = {}
    plans["unet"], unknown["unet"] = unet_plan(keys["unet"], unet_layers_per_block(unet_shapes))
    plans["vae"], unknown["vae"] = vae_plan(vae_keys, vae_levels)
    for spec in family.texts:
        if spec.layout == "clip":
            plans[spec.component], unknown[spec.component] = clip_plan(keys[spec.component])
        else:
            plans[spec.component], unknown[spec.component] = open_clip_plan(keys[spec.component], spec.with_projection)
    for name, rest in unknown.items():
        if rest:
            raise ExportError(f"{len(rest)} unrecognised {name} key(s) in the single file, e.g. "
                              f"{[prefixes[name] + k for k in rest[:3]]}: not a supported Stable Diffusion layout")
    others = [k for k in shapes if not k.startswith(tuple(prefixes.values())) and not IGNORED_KEYS.match(k)]
    if others:
        logger.warning("ignoring %d key(s) outside the components, e.g. %s", len(others), others[:3])
    return plans, prefixes


def _write_folder(target: Path, plan: SingleFilePlan, options: ConfigOptions, token: str | bool | None) -> None:
    """Write everything into a temporary folder beside `target`, then rename it into place."""
    file = plan.file
    assert file is not None  # only materialize_single_file calls this, with a plan read from a file
    record = {"format_version": FORMAT_VERSION, "source": str(plan.file), "model_type": plan.model_type,
              "pipeline_class": plan.pipeline_class, "clip_skip": plan.clip_skip}
    remove_stale_temp(target)  # conversions killed earlier
    tmp = temp_folder(target)
    try:
        for name, config in plan.configs.items():
            write_json(tmp / name / CONFIG_FILES.get(name, CONFIG_NAME), config)
        write_json(tmp / INDEX_NAME, plan.index if plan.index is not None else _index(plan, options))
        _copy_tokenizers(tmp, plan, options, token)
        for name, component_plan in plan.plans.items():
            _write_weights(file, plan.prefixes[name], component_plan, tmp / name / WEIGHT_FILES[name])
        for name, directory in plan.borrowed.items():
            _link_weights(directory, tmp / name)
        write_json(tmp / RECORD, record)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / RECORD).is_file():  # not a concurrent writer that finished first
                raise
    except OSError as error:
        raise ExportError(f"cannot write the converted checkpoint to {target}: {error}") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s (%s) into %s", plan.file, plan.model_type, target)


def _index(job: SingleFilePlan, options: ConfigOptions) -> dict[str, Any]:
    if options.config_folder is None:
        return model_index(job.family, job.pipeline_class)
    index = read_json(options.config_folder / INDEX_NAME, required=True, error=ConfigError)
    produced = set(job.configs) | {spec.tokenizer for spec in job.family.texts}
    for name, value in index.items():  # e.g. a safety checker the single file does not hold
        if isinstance(value, list) and len(value) == 2 and value[0] is not None and name not in produced:
            index[name] = [None, None]
    return index


def _copy_tokenizers(tmp: Path, job: SingleFilePlan, options: ConfigOptions, token: str | bool | None) -> None:
    names = list(job.tokenizers) if job.tokenizers is not None else [spec.tokenizer for spec in job.family.texts]
    if options.config_folder is not None:
        source = options.config_folder
    else:  # real checkpoints: the tokenizers of the base model's diffusers repo
        repo = job.family.base_repos[job.inpainting] or job.family.base_repos[0]
        source = hub_snapshot(repo, allow_patterns=[f"{n}/*" for n in names], token=token,
                              purpose=f"the tokenizers for a {job.model_type} single file "
                                      "(or pass config_folder=<a diffusers folder with them>)", error=ExportError)
    for name in names:
        if not (source / name).is_dir():
            raise ExportError(f"tokenizer folder missing: {source / name}")
        shutil.copytree(source / name, tmp / name)


def _link_weights(directory: Path, out: Path) -> None:
    """A config_folder component's default-variant safetensors (and shard index), hard-linked (no copy of a T5-XXL)
    or, across file systems, symlinked; its config is written from the plan."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(directory.iterdir()):
        if not default_weights(path.name):
            continue
        real = path.resolve()  # a Hub snapshot's files are symlinks into its blob store
        try:
            os.link(real, out / path.name)
        except OSError:
            os.symlink(real, out / path.name)


def _write_weights(file: Path, prefix: str, plan: Plan, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(str(file), framework="pt") as handle:
        for dst, take in plan.items():
            tensors[dst] = apply_take(handle.get_tensor(prefix + take.key), take)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "pt"})
