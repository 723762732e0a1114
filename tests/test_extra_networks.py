"""A1111's `<lora:...>` prompt tags, with the argument rules of its Lora extension (te, then unet, or by name)."""
from __future__ import annotations

import pytest

from diffrt.errors import InputError
from diffrt.runtime.extra_networks import LoraTag, extract_loras


@pytest.mark.parametrize(("prompt", "clean", "tags"), [
    ("a cat <lora:film:0.8>", "a cat ", [LoraTag("film", 0.8, 0.8)]),
    ("<lora:film>a cat", "a cat", [LoraTag("film", 1.0, 1.0)]),
    ("a <lora:film:1:0.5> cat", "a  cat", [LoraTag("film", 1.0, 0.5)]),
    ("a cat <lora:film:unet=0.5>", "a cat ", [LoraTag("film", 1.0, 0.5)]),
    ("<lora:film:unet=0.7:te=0.3>", "", [LoraTag("film", 0.3, 0.7)]),
    ("<lora:a:0.5:dyn=8>, (red:1.2) <lyco:b:-0.25>", ", (red:1.2) ", [LoraTag("a", 0.5, 0.5),
                                                                      LoraTag("b", -0.25, -0.25)]),
    ("no tags, (a:1.1) <not a tag>", "no tags, (a:1.1) <not a tag>", []),
])
def test_tags_are_taken_out_with_their_multipliers(prompt, clean, tags):
    assert extract_loras(prompt) == (clean, tags)


@pytest.mark.parametrize(("prompt", "fragment"), [
    ("<hypernet:x:1>", "applies <lora:...>, <lyco:...> only"),
    ("<lora:film:strong>", "'strong' where a finite number is expected"),
    ("<lora:film:nan>", "'nan' where a finite number is expected"),
    ("<lora:film:alpha=2>", "names 'alpha'"),
    ("<lora: :1>", "names no LoRA"),
])
def test_tags_diffrt_cannot_apply_are_refused_by_name(prompt, fragment):
    with pytest.raises(InputError, match="`negative_prompt`") as error:
        extract_loras(prompt, "negative_prompt")
    assert fragment in str(error.value)
