"""Argument types shared by the `diffrt` subcommands (argparse `type=` callables: a bad value is a one-line error
naming what was expected)."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any, Callable

from diffrt.runtime.generation import RANDOM_SEED, SEED_MAX


def component_list(text: str) -> list[str]:
    """argparse type of `--components`: comma-separated names, at least one."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated component names, got {text!r}")
    return names


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def comma_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list (e.g. diffusers,optimum); got {text!r}")
    return names


def _ints(text: str, separator: str, counts: tuple[int, ...], what: str) -> tuple[int, ...]:
    parts = text.strip().lower().split(separator)
    if len(parts) not in counts or not all(re.fullmatch(r"\d+", p) for p in parts) or not all(int(p) for p in parts):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return tuple(int(p) for p in parts)


def static_shape(text: str) -> tuple[int, int, int]:
    """"1x512x512" -> (batch, height, width)."""
    batch, height, width = _ints(text, "x", (3,), "BATCHxHEIGHTxWIDTH with positive integers (e.g. 1x512x512)")
    return batch, height, width


def image_size(text: str) -> tuple[int, int]:
    """"512" or "512x768" -> (height, width)."""
    values = _ints(text, "x", (1, 2), "SIZE or HEIGHTxWIDTH in pixels, positive integers (e.g. 512 or 512x768)")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def batch_range(text: str) -> int | tuple[int, int, int]:
    """"2" (fixed) or "1:1:4" (min:opt:max)."""
    values = _ints(text, ":", (1, 3), "N or MIN:OPT:MAX images per call, positive integers (e.g. 1:1:4)")
    return values[0] if len(values) == 1 else (values[0], values[1], values[2])


def int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"-?\d+", text.strip()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}")
        return int(text)

    return parse


def positive_int(text: str) -> int:
    """argparse type of counts (steps, images, threads, pixels): an integer >= 1."""
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def number_in(low: float, high: float | None = None, *, open_low: bool = False) -> Callable[[str], float]:
    """argparse type of a finite number in [low, high] (or (low, high] with `open_low`); nan and inf are refused,
    since float() accepts them and they would reach the pipeline as silent garbage."""
    left = "(" if open_low else "["
    allowed = f"a number in {left}{low}, {high}]" if high is not None else f"a number {'>' if open_low else '>='} {low}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def seed(text: str) -> int:
    """argparse type of `--seed`: an integer in [0, 2**63 - 1], or -1 for a random seed (A1111's convention)."""
    if not re.fullmatch(r"\s*-?\d+\s*", text) or not RANDOM_SEED <= int(text) <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], or -1 for a random seed; got "
                                         f"{text!r}")
    return int(text)


def utf8_text(text: str) -> str:
    """argparse type of prompts: text that is valid UTF-8. Python decodes argv with surrogate escapes, so invalid
    bytes arrive as lone surrogates that no tokenizer takes; name the first one instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = text[error.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"expected UTF-8 text; got the invalid byte {byte!r} at character "
                                         f"{error.start} of {text!r}") from None
    return text


def lora_spec(text: str) -> tuple[Path, float]:
    """`--lora PATH[:SCALE]`: a LoRA file (or folder / Hub repo id) and its weight (default 1). The scale is what
    follows the last `:` when that is a number, so paths with colons (C:\\...) still work."""
    path, _, scale = text.rpartition(":")
    try:
        value = float(scale) if path else None
    except ValueError:
        value = None
    if value is None:
        return Path(text), 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"LoRA scale must be a finite number; got {scale!r}")
    return Path(path), value


def engine_option(text: str) -> tuple[str | None, str, Any]:
    """`--engine-option [COMPONENT:]KEY=VALUE` -> (component or None for every engine, key, value); the value is
    read as JSON where it parses (`true`, `2`, `["NchwcTransformer"]`), else kept as text (`extended`)."""
    target, equals, raw = text.partition("=")
    component, _, key = target.rpartition(":")
    if not equals or not key.isidentifier() or (component and not component.isidentifier()):
        raise argparse.ArgumentTypeError(f"expected [COMPONENT:]KEY=VALUE such as vae_decoder:graph_optimization_level"
                                         f"=extended; got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return component or None, key, value


def add_prompt_weighting(parser: argparse.ArgumentParser) -> None:
    """`--prompt-weighting a1111|none`, the same for every command that reads prompts."""
    parser.add_argument("--prompt-weighting", choices=("a1111", "none"), default="a1111",
                        help="a1111 (default): AUTOMATIC1111's (word:1.3) / [word] emphasis, BREAK and prompts "
                             "longer than 75 tokens; none: Diffusers' plain prompts, cut at 77 tokens")


def prompt_weighting(args: argparse.Namespace) -> str | None:
    return None if args.prompt_weighting == "none" else args.prompt_weighting
