"""AUTOMATIC1111's prompt syntax: emphasis weights and BREAK, parsed into (text, weight) fragments.

The documented rules: `(text)` multiplies the attention to `text` by 1.1, `[text]` divides it by 1.1, `(text:1.5)`
sets a factor, brackets nest (their factors multiply), `\\(` `\\)` `\\[` `\\]` are literal brackets, a bracket left
open applies to the rest of the prompt, and the word `BREAK` (in capitals, on its own) ends the current 75-token
chunk. One deliberate difference from A1111: a `BREAK` inside brackets still breaks (A1111 then encodes the word
"BREAK" as text, which nobody means).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1  # the factor of one level of () or []

_TOKENS = re.compile(
    r"""
    \\[()\[\]\\]             # an escaped bracket or backslash: literal
    | \\                     # a lone backslash: literal
    | \(                     # open round: x1.1 (or the factor given before its close)
    | \[                     # open square: /1.1
    | :\s*([+-]?[.\d]+)\s*\) # ":1.5)" closes a round bracket with an explicit factor
    | \)
    | ]
    | [^\\()\[\]:]+          # plain text
    | :                      # a colon that is not a factor
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass
class Fragment:
    """A run of prompt text with one weight; `is_break` marks a BREAK (its text is empty)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_prompt(prompt: str) -> list[Fragment]:
    """`prompt` in A1111's syntax -> fragments with their weights, neighbours of equal weight merged.

    >>> [(f.text, round(f.weight, 4)) for f in parse_prompt("a (red:1.5) [cat]")]
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9091)]
    """
    fragments: list[Fragment] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment.weight *= factor

    for match in _TOKENS.finditer(prompt):
        token, factor = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append(Fragment(token[1:] if len(token) == 2 else token))
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif factor is not None and round_open:
            multiply_from(round_open.pop(), _factor(factor))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), EMPHASIS)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), 1 / EMPHASIS)
        else:
            fragments.extend(_split_breaks(token))
    for start in round_open:
        multiply_from(start, EMPHASIS)
    for start in square_open:
        multiply_from(start, 1 / EMPHASIS)
    return _merge(fragments) or [Fragment("")]


def _factor(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "1.2.3" matches the pattern; A1111 fails there too, we say where
        raise ValueError(f"`prompt` has an emphasis factor {text!r} that is not a number") from None


def _split_breaks(text: str) -> list[Fragment]:
    parts = _BREAK.split(text)
    out: list[Fragment] = []
    for i, part in enumerate(parts):
        if i:
            out.append(Fragment("", is_break=True))
        if part:
            out.append(Fragment(part))
    return out


def _merge(fragments: list[Fragment]) -> list[Fragment]:
    merged: list[Fragment] = []
    for fragment in fragments:
        last = merged[-1] if merged else None
        if last and not last.is_break and not fragment.is_break and last.weight == fragment.weight:
            last.text += fragment.text
        elif fragment.is_break or fragment.text:
            merged.append(Fragment(fragment.text, fragment.weight, fragment.is_break))
    return merged
