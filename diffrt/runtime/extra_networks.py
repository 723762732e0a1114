"""AUTOMATIC1111's extra-network tags in a prompt: `<lora:NAME:TE[:UNET]>` (also `<lyco:...>`), which A1111 strips
from the prompt before encoding it and applies as adapters to the whole call.

Arguments follow A1111's Lora extension: the first number is the text-encoder multiplier (default 1), the second the
UNet's (default: the text encoder's); `te=` / `unet=` name them, in any order. `dyn=` (DyLoRA rank) is accepted and
ignored, as for plain LoRA files. Other tag kinds (`<hypernet:...>`) are refused by name: diffrt has no hypernetworks,
and leaving the tag in the prompt would silently make a different image than the user's A1111.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from diffrt.errors import InputError

TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the adapter's name and its text-encoder and UNet multipliers."""

    name: str
    text_encoder_scale: float = 1.0
    unet_scale: float = 1.0


def extract_loras(prompt: str, parameter: str = "prompt") -> tuple[str, list[LoraTag]]:
    """(the prompt without its tags, the LoRA tags in order). InputError naming `parameter` for a malformed tag or a
    tag kind diffrt does not apply."""
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        kind, body = match.group(1), match.group(2)
        if kind not in LORA_KINDS:
            raise InputError(f"`{parameter}` has an extra-network tag {match.group(0)!r}: diffrt applies "
                             f"{', '.join(f'<{k}:...>' for k in LORA_KINDS)} only")
        tags.append(_lora_tag(match.group(0), body, parameter))
        return ""

    return TAG.sub(take, prompt), tags


def _lora_tag(tag: str, body: str, parameter: str) -> LoraTag:
    name, *arguments = body.split(":")
    positional: list[float] = []
    named: dict[str, float] = {}
    for argument in arguments:
        key, _, value = argument.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise InputError(f"`{parameter}`: {tag!r} has {argument!r} where a finite number is expected "
                             "(<lora:NAME:TE_MULTIPLIER[:UNET_MULTIPLIER]>)")
        if key:
            if key not in ("te", "unet", "dyn"):
                raise InputError(f"`{parameter}`: {tag!r} names {key!r}; the names are te, unet and dyn")
            named[key] = number
        else:
            positional.append(number)
    if not name.strip():
        raise InputError(f"`{parameter}`: {tag!r} names no LoRA")
    text_encoder = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else text_encoder)
    return LoraTag(name.strip(), text_encoder, unet)
