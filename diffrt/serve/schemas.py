"""Request bodies with the field names and defaults of the APIs they copy: OpenAI's Images API and AUTOMATIC1111's
`/sdapi/v1`. Unknown fields are accepted and ignored, as both servers do (clients send many we have no use for).
NaN and infinity are refused (422 naming the field)."""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, protected_namespaces=())


class LoraSpec(_Body):
    """diffrt's explicit `loras` entry: a LoRA of --lora-dir by name (or alias) and its weight (A1111's multiplier,
    for the text encoders and the UNet alike). A weight that is not finite is a 400 naming `loras`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)

    name: str
    weight: float = 1.0


def _json_text(value: object) -> object:
    """A form field (`/v1/images/edits`) carries `loras` as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # reported by the field's own validation
    return value


class ImageGenerationRequest(_Body):
    """`POST /v1/images/generations`. OpenAI's fields, then diffrt's extras (the openai client sends them with
    `extra_body=`). `size` and `steps` default to the package's own (its trained size, the pipeline's steps)."""

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str = "url"  # OpenAI's default for DALL-E models
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    #: LoRAs to apply besides the prompt's `<lora:NAME:WEIGHT>` tags (needs --lora-dir)
    loras: list[LoraSpec] | None = None
    #: DeepCache for a package exported with it: the full UNet every N steps (1: off; default: --deep-cache)
    deep_cache_interval: int | None = None

    _loras_from_form = field_validator("loras", mode="before")(_json_text)


class ImageEditRequest(ImageGenerationRequest):
    """The form fields of `POST /v1/images/edits` (the image and mask come as files). `strength` defaults to 1.0
    with a mask (the masked region is repainted from noise) and to 0.8 without (Diffusers' image-to-image)."""

    strength: float | None = None


class Txt2ImgRequest(_Body):
    """`POST /sdapi/v1/txt2img`, with A1111's defaults (modules/processing.py, StableDiffusionProcessing)."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    #: extensions' arguments; diffrt reads the ControlNet extension's (`diffrt.serve.a1111_controlnet`)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    #: diffrt's extension: LoRAs to apply besides the prompt's `<lora:NAME:WEIGHT>` tags (needs --lora-dir)
    loras: list[LoraSpec] | None = None
    #: diffrt's extension: DeepCache for a package exported with it, the full UNet every N steps (1: off;
    #: default: the server's --deep-cache)
    deep_cache_interval: int | None = None


class Img2ImgRequest(Txt2ImgRequest):
    """`POST /sdapi/v1/img2img`: base64 `init_images` (the first is used), an optional base64 `mask` (white =
    repaint, or black with `inpainting_mask_invert=1`)."""

    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class OptionsUpdate(_Body):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    sd_model_checkpoint: str | None = None
