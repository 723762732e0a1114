"""What an export writes: the package components a checkpoint gives, and the refusal of what diffrt cannot export.

A checkpoint the exporter does not fully understand must not become a package that looks complete and fails at
load (a PixArt checkpoint would otherwise give a package of its T5 encoder and VAE, its PixArt transformer silently
dropped). So, from model_index.json alone, before any weights are read or anything is written:

- without `components`, the pipeline class must be one the runtime runs and every component one diffrt exports
  (or one a deployment package leaves out on purpose: safety checker, feature extractor, image encoder);
- with `components`, the user asks for a subset on purpose: only the requested components (and the scheduler the
  UNet or transformer needs) must be exportable.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from diffrt.errors import ConfigError, invalid
from diffrt.export.onnx import T5_ENCODER_CLASSES, TEXT_ENCODER_CLASSES
from diffrt.runtime.pipelines.registry import PIPELINES
from diffrt.schedulers import registered_names

if TYPE_CHECKING:
    from diffrt.export.checkpoint import IndexCheck

logger = logging.getLogger(__name__)

TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")
TRANSFORMER_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")
#: checkpoint folder -> the classes diffrt exports from it (FLUX's second and SD3's third text encoder are T5)
SOURCE_CLASSES: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "transformer": TRANSFORMER_CLASSES,
    "text_encoder": TEXT_ENCODER_CLASSES, "text_encoder_2": TEXT_ENCODER_CLASSES + T5_ENCODER_CLASSES,
    "text_encoder_3": T5_ENCODER_CLASSES,
    "tokenizer": TOKENIZER_CLASSES, "tokenizer_2": TOKENIZER_CLASSES + T5_TOKENIZER_CLASSES,
    "tokenizer_3": T5_TOKENIZER_CLASSES,
    # a saved ControlNet pipeline's own ControlNet, exported as `controlnet_controlnet` (see `bundled_controlnets`)
    "controlnet": ("ControlNetModel",),
}
#: package component -> the checkpoint folder its weights come from
WEIGHTS_OF = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
              "unet": "unet", "transformer": "transformer", "vae_encoder": "vae", "vae_decoder": "vae"}
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
#: the denoisers: a package has one of them, and the scheduler serves it
DENOISERS = ("unet", "transformer")

Components = Mapping[str, tuple[str, str]]  # model_index.json: name -> (library, class)


def available_components(components: Components) -> list[str]:
    """The package components a checkpoint can give, in export order."""
    names = [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3", *DENOISERS) if name in components]
    return names + (["vae_encoder", "vae_decoder"] if "vae" in components else [])


def check_exportable(source_id: str, pipeline_class: str, components: Components,
                     requested: Sequence[str] | None) -> None:
    """ConfigError naming every pipeline class or component of the checkpoint diffrt cannot export (see the module
    docstring); reads nothing but the arguments, so it runs before any download or weight is loaded."""
    if requested is not None:
        _check_requested(source_id, pipeline_class, components, requested)
        return
    problems = [] if pipeline_class in PIPELINES else [f"the pipeline class {pipeline_class}"]
    problems += [f"the component `{name}` ({cls})" for name, (_, cls) in components.items()
                 if not _exportable(name, cls)]
    if problems:
        exportable = [name for name in available_components(components)
                      if _exportable(WEIGHTS_OF[name], components[WEIGHTS_OF[name]][1])]
        subset = (f"; pass `components` (--components) to export a subset of {', '.join(exportable)} on purpose"
                  if exportable else "")
        raise ConfigError(f"{source_id}: diffrt cannot export {', '.join(problems)}; it exports the pipelines "
                          f"{', '.join(sorted(PIPELINES))}{subset}")


def _check_requested(source_id: str, pipeline_class: str, components: Components, requested: Sequence[str]) -> None:
    available = available_components(components)
    missing = [name for name in requested if name not in available]
    if missing:
        raise invalid("components", f"a subset of what {source_id} has ({', '.join(available)})", missing[0])
    folders = [WEIGHTS_OF[name] for name in requested]
    folders += [TOKENIZER_OF[name] for name in requested if TOKENIZER_OF.get(name) in components]
    for folder in folders:
        class_name = components[folder][1]
        if not _exportable(folder, class_name):
            raise invalid(f"{folder} class", f"one of {', '.join(SOURCE_CLASSES[folder])}", class_name, ConfigError)
    scheduler = components.get("scheduler")
    denoises = any(name in requested for name in DENOISERS)
    if denoises and scheduler is not None and not _exportable("scheduler", scheduler[1]):
        raise invalid("scheduler class", "a scheduler diffrt implements", scheduler[1], ConfigError)


def _exportable(name: str, class_name: str) -> bool:
    if name == "scheduler":
        return class_name in registered_names()
    return class_name in SOURCE_CLASSES.get(name, ())


def plan_components(src: Any, requested: Sequence[str] | None) -> list[str]:
    """The components to export from the resolved checkpoint `src`, in export order (errors as `check_exportable`)."""
    check_exportable(src.id, src.pipeline_class, src.components, requested)
    names = [name for name in available_components(src.components) if requested is None or name in requested]
    if src.pipeline_class not in PIPELINES:  # a subset asked for on purpose (else refused above)
        logger.warning("%s is a %s, which diffrt has no pipeline for: the package holds the components %s for use "
                       "one by one", src.id, src.pipeline_class, ", ".join(names))
    return names


def bundled_controlnets(src: Any, requested: Sequence[str] | None,
                        controlnets: Sequence[str | Path] | None) -> Sequence[str | Path] | None:
    """`controlnets` with the checkpoint's own `controlnet` folder first (a saved StableDiffusionControlNetPipeline
    carries one), named `controlnet` as `--controlnet CK/controlnet` would name it; a subset export leaves it out."""
    if requested is not None or "controlnet" not in src.components:
        return controlnets
    return [f"controlnet={Path(src.path) / 'controlnet'}", *(controlnets or [])]


def check_index(requested: Sequence[str] | None) -> IndexCheck:
    """`check_exportable` for `resolve_source(check=...)`, called with model_index.json's facts once it is read."""
    return lambda source_id, pipeline_class, components: check_exportable(source_id, pipeline_class, components,
                                                                          requested)
