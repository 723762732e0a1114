"""A1111's infotext: written in A1111's order and quoting, read as A1111 reads it (its own documented examples),
and every sampler name diffrt knows survives the trip scheduler -> infotext -> scheduler."""
from __future__ import annotations

import pytest

from diffrt.errors import InputError
from diffrt.runtime.builtin import resolve_builtin
from diffrt.runtime.infotext import (
    format_infotext,
    model_hash,
    parse_infotext,
    parse_size,
    quote,
    sampler_fields,
    scheduler_from_fields,
)
from diffrt.schedulers import from_name, load_config
from diffrt.schedulers.names import SAMPLERS, SCHEDULES

# The example in the docstring of A1111's parse_generation_parameters (modules/infotext_utils.py)
A1111_EXAMPLE = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse "
    "Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
    "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)
DIGITS_CONFIG = load_config(resolve_builtin("digits") / "scheduler" / "scheduler_config.json")


def test_fields_are_written_in_a1111_order_without_empty_ones():
    text = format_infotext("a cat", None, {"Model": "sd15", "Denoising strength": None, "Seed": 123, "Steps": 20,
                                           "CFG scale": 7.0, "Size": "512x768", "Sampler": "DPM++ 2M",
                                           "Schedule type": "Karras", "Model hash": "0123456789"})
    assert text == ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, "
                    "Size: 512x768, Model hash: 0123456789, Model: sd15")


def test_negative_prompt_line_only_when_there_is_one():
    assert format_infotext("a", "", {"Steps": 1}) == "a\nSteps: 1"
    assert format_infotext("a", "b", {"Steps": 1}) == "a\nNegative prompt: b\nSteps: 1"


@pytest.mark.parametrize(("value", "written"), [
    ("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"'), ('say "hi", ok', '"say \\"hi\\", ok"'),
    (7.0, "7"), (7.5, "7.5"), (0.6, "0.6"), (123, "123"),
])
def test_values_are_quoted_as_a1111_quotes_them(value, written):
    assert quote(value) == written


def test_a1111_documented_example_parses():
    parsed = parse_infotext(A1111_EXAMPLE)
    assert parsed.prompt.startswith("girl with an artist's beret") and parsed.prompt.endswith("intricate")
    assert parsed.negative_prompt.startswith("ugly, fat") and parsed.negative_prompt.endswith("messy drawing")
    assert parsed.fields == {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086",
                             "Size": "512x512", "Model hash": "45dee52b"}


def test_multiline_prompts_and_quoted_values_round_trip():
    fields = {"Steps": 20, "Sampler": "Euler", "Seed": 1, "Model": "my, model: v2"}
    text = format_infotext("line one\nline two", "neg one\nneg two", fields)
    parsed = parse_infotext(text)
    assert (parsed.prompt, parsed.negative_prompt) == ("line one\nline two", "neg one\nneg two")
    assert parsed.fields == {k: str(v) for k, v in fields.items()}


def test_a_prompt_without_a_parameter_line_is_all_prompt():
    assert parse_infotext("just a prompt\nSteps: 20").prompt == "just a prompt\nSteps: 20"


@pytest.mark.parametrize("name", [f"{s} {t}".strip() for s in SAMPLERS for t in ("", *SCHEDULES)])
def test_every_sampler_name_survives_the_infotext(name: str):
    """scheduler -> (Sampler, Schedule type) -> the name `--scheduler` takes -> the same scheduler config."""
    try:
        scheduler = from_name(name, DIGITS_CONFIG)
    except ValueError:
        pytest.skip(f"{name!r} is not a combination diffrt builds")
    sampler, schedule = sampler_fields(scheduler, DIGITS_CONFIG, ays=False)
    name_again, ays = scheduler_from_fields({"Sampler": sampler, "Schedule type": schedule})
    assert not ays and name_again is not None
    again = from_name(name_again, DIGITS_CONFIG)
    assert type(again) is type(scheduler) and dict(again.config) == dict(scheduler.config)


def test_a1111_names_are_used_where_one_matches_and_class_names_elsewhere():
    assert sampler_fields(from_name("DPM++ 2M SDE Karras", DIGITS_CONFIG), DIGITS_CONFIG, False) == (
        "DPM++ 2M SDE", "Karras")
    assert sampler_fields(from_name("Euler", DIGITS_CONFIG), DIGITS_CONFIG, True) == ("Euler", "Align Your Steps")
    from diffrt.schedulers import TCDScheduler

    assert sampler_fields(TCDScheduler.from_config(DIGITS_CONFIG), DIGITS_CONFIG, False)[0] == "TCDScheduler"


def test_schedule_types_map_back():
    assert scheduler_from_fields({"Sampler": "Euler", "Schedule type": "Automatic"}) == ("Euler", False)
    assert scheduler_from_fields({"Sampler": "Euler"}) == ("Euler", False)
    assert scheduler_from_fields({"Sampler": "DPM++ 2M", "Schedule type": "Karras"}) == ("DPM++ 2M Karras", False)
    assert scheduler_from_fields({"Sampler": "Euler", "Schedule type": "Align Your Steps"}) == ("Euler", True)
    assert scheduler_from_fields({}) == (None, False)


def test_size_is_width_by_height():
    assert parse_size("512x768") == (768, 512)
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        parse_size("512 by 768")


def test_model_hash_depends_on_the_weights_only():
    weights = {"unet/diffusion_pytorch_model.safetensors": "ab" * 32,
               "vae/diffusion_pytorch_model.safetensors": "cd" * 32}
    fp32 = {"precision": "fp32", "created": "2026-01-01", "source": {"weights_sha256": weights}}
    fp16 = {"precision": "fp16", "created": "2026-02-02", "source": {"weights_sha256": dict(reversed(weights.items()))}}
    digest = model_hash(fp32)
    assert digest is not None and len(digest) == 10 and int(digest, 16) >= 0
    assert model_hash(fp16) == digest
    more = {**weights, "text_encoder/model.safetensors": "ef" * 32}
    assert model_hash({"source": {"weights_sha256": more}}) != digest
    assert model_hash({"source": {}}) is None and model_hash(None) is None and model_hash({"source": "x"}) is None
