"""AUTOMATIC1111's "infotext": the generation parameters as text, written into images and read back.

The format, as A1111's `create_infotext` (modules/processing.py) writes it and `parse_generation_parameters`
(modules/infotext_utils.py) reads it:

    a photo of a cat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: ...

The prompt (any number of lines), a `Negative prompt:` line only when there is one (it may run on over several
lines), then one line of `Key: value` pairs in A1111's order, pairs without a value left out. A value holding `,`,
`:` or a newline is written as a JSON string. `Size` is WIDTHxHEIGHT. A1111 before 1.9 wrote the schedule into the
sampler name ("DPM++ 2M Karras", no `Schedule type`); both forms are read.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from diffrt.errors import InputError

# A1111's order of the fields diffrt has (others sit between them in A1111; absent ones are simply left out)
FIELD_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
               "Denoising strength")
# `key: value` where value is a JSON string or runs to the next comma (A1111's `re_param`)
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
NEGATIVE = "Negative prompt:"
AUTOMATIC = "Automatic"  # A1111's schedule type for "the sampler's own schedule"
ALIGN_YOUR_STEPS = "Align Your Steps"
# diffrt.schedulers.names schedule types -> A1111's labels for them (modules/sd_schedulers.py)
SCHEDULE_LABELS = {"Karras": "Karras", "sgm_uniform": "SGM Uniform", "simple": "Simple",
                   "Exponential": "Exponential", "beta": "Beta"}
MODEL_HASH_LENGTH = 10  # A1111's "short hash": the first 10 hex digits of a sha256


@dataclass
class Infotext:
    """A parsed infotext: the prompts and the parameter line's fields, values unquoted, in the order read."""

    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a comma, a colon or a newline."""
    text = _text(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        return value if isinstance(value, str) else text
    return text


def _text(value: Any) -> str:
    """Numbers as A1111 shows them: 7.0 as "7", 7.5 as "7.5" (repr keeps every digit a seed or a strength has)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative_prompt: str | None, fields: Mapping[str, Any]) -> str:
    """The infotext of one image. `fields` values of None are left out; known keys go in A1111's order."""
    ordered = [k for k in FIELD_ORDER if k in fields] + [k for k in fields if k not in FIELD_ORDER]
    line = ", ".join(f"{key}: {quote(fields[key])}" for key in ordered if fields[key] is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def parse_infotext(text: str) -> Infotext:
    """Read an infotext as A1111 does: the last line holds the parameters when it has at least 3 `key: value`
    pairs; lines before `Negative prompt:` are the prompt, the rest the negative prompt."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        line = line.strip()
        if negative is None and line.startswith(NEGATIVE):
            negative = [line[len(NEGATIVE):].strip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {key.strip(): unquote(value.strip()) for key, value in PARAM.findall(last)}
    return Infotext("\n".join(prompt), "\n".join(negative or []), fields)


# ----- diffrt's values as A1111 fields and back -----
def sampler_fields(scheduler: Any, package_config: Mapping[str, Any], ays: bool) -> tuple[str, str]:
    """(Sampler, Schedule type) for a scheduler: the A1111 sampler name whose settings it has (diffrt.schedulers.
    names, inverted), else its Diffusers class name (which `diffrt generate --scheduler` also takes); the schedule
    type from its sigma flags, "SGM Uniform" for trailing spacing the package does not have by default, else
    "Automatic" (the package's own schedule, what A1111 writes for a sampler's default)."""
    from diffrt.schedulers.base import init_keys
    from diffrt.schedulers.names import SAMPLERS, SCHEDULES, SIGMA_FLAGS

    class_name, config = type(scheduler).__name__, dict(scheduler.config)
    keys = init_keys(type(scheduler))
    sampler = next((name for name, (cls, options) in SAMPLERS.items() if cls == class_name
                    and all(config.get(k) == v for k, v in options.items() if k in keys)), class_name)
    if ays:
        return sampler, ALIGN_YOUR_STEPS
    for schedule, options in SCHEDULES.items():
        flags = [key for key in options if key in SIGMA_FLAGS]
        if flags and all(config.get(flag) for flag in flags):
            return sampler, SCHEDULE_LABELS[schedule]
    trailing = config.get("timestep_spacing") == "trailing"
    if trailing and package_config.get("timestep_spacing") != "trailing":
        return sampler, SCHEDULE_LABELS["sgm_uniform"]
    return sampler, AUTOMATIC


def scheduler_from_fields(fields: Mapping[str, str]) -> tuple[str | None, bool]:
    """(the `--scheduler` name, whether AYS) for an infotext's Sampler and Schedule type; (None, False) without a
    Sampler. The name may still be unknown: `--scheduler` reports that with the names it knows."""
    sampler = fields.get("Sampler")
    schedule = fields.get("Schedule type", AUTOMATIC)
    if not sampler:
        return None, False
    if schedule == ALIGN_YOUR_STEPS:
        return sampler, True
    return (sampler if schedule == AUTOMATIC else f"{sampler} {schedule}"), False


def parse_size(text: str) -> tuple[int, int]:
    """"512x768" (A1111's WIDTHxHEIGHT) -> (height, width)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if match is None:
        raise InputError(f"infotext `Size` must be WIDTHxHEIGHT (e.g. 512x768); got {text!r}")
    return int(match.group(2)), int(match.group(1))


def model_hash(manifest: Mapping[str, Any] | None) -> str | None:
    """A short hash of the weights a package was exported from: sha256 over the manifest's sorted
    `source.weights_sha256` lines, first 10 hex digits (A1111's length). The same weights give the same hash
    whatever the precision, target or export date; None for packages without weight hashes (Optimum's)."""
    source = (manifest or {}).get("source")
    weights = source.get("weights_sha256") if isinstance(source, Mapping) else None
    if not isinstance(weights, Mapping) or not weights:
        return None
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(weights.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()[:MODEL_HASH_LENGTH]
