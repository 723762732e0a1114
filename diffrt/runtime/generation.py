"""What every front end (the `diffrt generate` command, the HTTP server) does around one pipeline call, in one place
so that the same request gives the same image and the same record whichever front end made it.

- Seeds follow AUTOMATIC1111: -1 (or none) draws a random first seed below 2**32, as A1111 does; image i of a
  request has seed `seed + i` and its own generator, so any image can be made again alone from its seed.
- A scheduler is chosen by Diffusers class name or A1111 sampler name ("DPM++ 2M Karras"), built on the package's
  own scheduler config.
- The A1111 infotext fields of an image (`Steps`, `Sampler`, `Seed`, ...), written by `runtime/infotext.py`.
- Prompts are read with A1111's emphasis syntax and long-prompt rule by default (`DEFAULT_PROMPT_WEIGHTING`): what
  A1111's users and its API clients send.
"""
from __future__ import annotations

import inspect
import os
import random
from pathlib import Path
from typing import Any

from diffrt.errors import InputError

# torch (and diffrt.rng) take seeds up to 2**64 - 1; images of a batch use seed, seed + 1, ..., so the top is kept
# well clear of that. A drawn seed stays below 2**32, as AUTOMATIC1111 draws them, so its UI can take it back.
SEED_MAX = 2**63 - 1
RANDOM_SEED = -1
RANDOM_SEED_LIMIT = 2**32  # A1111 draws random seeds below 2**32
DEFAULT_PROMPT_WEIGHTING = "a1111"


def seeds_for(first: int | None, count: int, parameter: str = "seed") -> list[int]:
    """seed, seed + 1, ... (A1111's rule); a random first seed for None or -1. InputError naming `parameter` when
    a seed is out of [0, 2**63 - 1]."""
    if first is None or first == RANDOM_SEED:
        first = random.SystemRandom().randrange(RANDOM_SEED_LIMIT)
    if first < 0 or first + count - 1 > SEED_MAX:
        raise InputError(f"`{parameter}` must be in [0, 2**63 - 1] (or -1 for a random seed), with room for "
                         f"{count} image(s) at seed + i; got {first}")
    return [first + i for i in range(count)]


def scheduler_for(config: Any, name: str) -> Any:
    """The scheduler called `name` (a Diffusers class name or an A1111 / ComfyUI sampler name) on `config`, the
    package's scheduler config. ValueError listing the known names for an unknown one."""
    from diffrt import schedulers

    if name in schedulers.registered_names():
        return schedulers.get_scheduler_class(name).from_config(config)
    return schedulers.from_name(name, config)


def model_name(package: str | os.PathLike[str]) -> str:
    """A1111's `Model`: a short name, not a path (a path would tell a shared image's reader about this machine):
    a local folder's name; built-in names and Hub ids as given."""
    text = os.fspath(package)
    return Path(os.path.abspath(text)).name if os.path.isdir(text) else text  # abspath: links kept


def call_defaults(pipe: Any) -> dict[str, Any]:
    """The defaults of the pipeline's `__call__` (steps, guidance, strength, ...), as Diffusers documents them."""
    return {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()}


def infotext_fields(pipe: Any, scheduler: Any, *, steps: int, guidance: float | None, seed: int, width: int,
                    height: int, model: str, strength: float | None = None, ays: bool = False) -> dict[str, Any]:
    """The A1111 infotext fields of one image made by `pipe` with `scheduler` (None values are left out when
    written)."""
    from diffrt.runtime.infotext import model_hash, sampler_fields

    sampler, schedule = sampler_fields(scheduler, pipe.package.scheduler_config, ays)
    return {"Steps": steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": guidance, "Seed": seed,
            "Size": f"{width}x{height}", "Model hash": model_hash(pipe.package.manifest), "Model": model,
            "Denoising strength": strength}



def weighting_kwargs(pipe: Any, weighting: str | None) -> dict[str, Any]:
    """`prompt_weighting=` for a pipeline call, when the pipeline reads prompts (the digits model has none)."""
    return {"prompt_weighting": weighting} if weighting and "prompt_weighting" in call_defaults(pipe) else {}


def prompt_chunk_count(pipe: Any, texts: list[str], weighting: str | None) -> int:
    """How many 77-token chunks the longest of `texts` takes under `weighting` (1 for plain prompts, which are cut
    at 77 tokens); InputError naming `prompt` when a text needs more than the package's UNet takes. Requests with
    different counts must not share a call: the shorter would be padded with empty chunks, changing its image."""
    from diffrt.runtime.prompt_chunks import CHUNK_TOKENS, prompt_chunks

    tokenizer = getattr(pipe, "tokenizer", None)
    if not weighting_kwargs(pipe, weighting) or tokenizer is None:
        return 1
    count = max((prompt_chunks(tokenizer, text).count for text in texts), default=1)
    limit = pipe.max_prompt_chunks()
    if count > limit:
        raise InputError(f"`prompt` needs {count} chunks of {CHUNK_TOKENS} tokens; this package's UNet takes at most "
                         f"{limit} ({limit * CHUNK_TOKENS} tokens): shorten it")
    return count
