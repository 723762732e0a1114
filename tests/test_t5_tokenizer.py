"""T5 tokenizer: a package folder written by `write_t5_tokenizer`, read by the torch-free runtime tokenizer, gives
the ids transformers' T5TokenizerFast gives for the checkpoint (as Diffusers' SD3 / FLUX pipelines call it).

Two vocabularies, both built locally: `make_t5`'s letters, and a Unigram vocabulary trained here on sentences with
uppercase, punctuation, digits and non-ASCII text (with T5's sentinel tokens added).
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoint_fixtures import make_t5

from diffrt.errors import ExportError, InputError, PackageError
from diffrt.export.tokenizers import write_t5_tokenizer
from diffrt.runtime.tokenizer_t5 import T5Tokenizer

CORPUS = [
    "A photo of an astronaut riding a horse on Mars, 4K, highly detailed.",
    "Café au lait at 7:30 AM; naïve résumé (2024) — über cool!",
    "東京の夜景, neon lights & rain: 100% cinematic?",
    "Ünïcödé ümlauts, ß and Ø; \"quotes\", #hashtags, @mentions, 3.14159",
    "The QUICK brown fox jumps over the lazy dog 12 times!!!",
    "a cat, a dog; three birds... and 5 fish",
]
PROMPTS = [
    "a photo of a cat",
    "",
    "A Photo, Of A CAT!",
    "  leading  and   inner   spaces ",
    "Café au lait at 7:30 AM — 東京 ümlaut 3.14",
    "text with </s> and <pad> inside",
    "emoji 🐱 and tabs\tand\nnewlines",
]


def reference_ids(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="np")
    return out.input_ids.astype(np.int64)


def letters_source(root: Path) -> Path:
    _, tokenizer = make_t5(root)
    tokenizer.save_pretrained(root / "tokenizer_3")
    return root / "tokenizer_3"


def trained_source(root: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=3)
    tokenizer.save_pretrained(root / "tokenizer_2")
    return root / "tokenizer_2"


@pytest.fixture(scope="module", params=["letters", "trained"])
def tokenizers_pair(request, tmp_path_factory):
    """(transformers' T5TokenizerFast loaded from the checkpoint folder, our tokenizer on the package folder)."""
    from transformers import T5TokenizerFast

    root = tmp_path_factory.mktemp(f"t5_tok_{request.param}")
    source = letters_source(root) if request.param == "letters" else trained_source(root)
    write_t5_tokenizer(source, root / "package" / source.name)
    return T5TokenizerFast.from_pretrained(str(source)), T5Tokenizer.from_folder(root / "package" / source.name)


@pytest.mark.parametrize("max_length", [1, 8, 77, 256])
def test_ids_match_transformers_prompt_by_prompt(tokenizers_pair, max_length):
    reference, ours = tokenizers_pair
    for prompt in PROMPTS:
        expected = reference_ids(reference, [prompt], max_length)
        np.testing.assert_array_equal(ours([prompt], max_length), expected, err_msg=repr(prompt))


def test_batch_of_three_short_exact_and_over_long(tokenizers_pair):
    reference, ours = tokenizers_pair
    exact_text = "a cat sat"
    exact = len(reference(exact_text).input_ids)  # words + end token: fills max_length exactly
    batch = ["a dog", exact_text, " ".join(CORPUS)]
    ids = ours(batch, exact)
    assert ids.dtype == np.int64 and ids.shape == (3, exact)
    np.testing.assert_array_equal(ids, reference_ids(reference, batch, exact))
    assert ids[1, -1] == ours.eos_token_id and ids[2, -1] == ours.eos_token_id
    assert ids[0, -1] == ours.pad_token_id


def test_truncation_reports_and_logs_the_cut_text(tokenizers_pair, caplog):
    reference, ours = tokenizers_pair
    prompts = ["a", "a photo of an astronaut riding a horse on the moon"]
    full = reference(prompts[1]).input_ids
    with caplog.at_level(logging.WARNING, logger="diffrt.runtime.tokenizer_t5"):
        encoding = ours.tokenize(prompts, 6)
    assert encoding.truncated_tokens == (0, len(full) - 6)
    # Diffusers' removed text: the ids after the kept max_length - 1, before the end token
    removed = reference.decode(full[5:-1])
    assert encoding.removed_text == ("", removed)
    assert removed.strip() and removed in caplog.text and "`max_sequence_length` is set to 6 tokens" in caplog.text


def test_no_warning_without_truncation(tokenizers_pair, caplog):
    _, ours = tokenizers_pair
    with caplog.at_level(logging.WARNING, logger="diffrt.runtime.tokenizer_t5"):
        encoding = ours.tokenize(["a cat"], 64)
    assert encoding.truncated_tokens == (0,) and not caplog.records


def test_package_folder_is_transformers_readable_and_has_no_baked_length(tokenizers_pair, tmp_path):
    import json

    from transformers import T5TokenizerFast

    reference, ours = tokenizers_pair
    folder = tmp_path / "copy"
    write_t5_tokenizer(Path(reference.name_or_path), folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["padding"] is None and data["truncation"] is None
    assert (folder / "tokenizer_config.json").is_file() and not (folder / "spiece.model").exists()
    reloaded = T5TokenizerFast.from_pretrained(str(folder))
    np.testing.assert_array_equal(reference_ids(reloaded, PROMPTS, 32), reference_ids(reference, PROMPTS, 32))


def test_missing_tokenizer_json_is_a_package_error_naming_it(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(PackageError, match="tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
    with pytest.raises(PackageError, match="does not exist"):
        T5Tokenizer.from_folder(tmp_path / "absent")


def test_bad_arguments_name_the_parameter(tokenizers_pair):
    _, ours = tokenizers_pair
    with pytest.raises(InputError, match="`max_length` must be an integer >= 1"):
        ours(["a"], 0)
    with pytest.raises(InputError, match="`texts`"):
        ours([], 8)


def test_runtime_t5_tokenizer_imports_no_torch_or_transformers():
    code = ("import sys, diffrt.runtime.tokenizer_t5\n"
            "print(','.join(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert result.stdout.strip() == ""


def test_unreadable_checkpoint_tokenizer_is_an_export_error_naming_the_folder(tmp_path):
    (tmp_path / "empty").mkdir()  # an existing folder: transformers reads it locally, never from the Hub
    with pytest.raises(ExportError, match="cannot read the T5 tokenizer in .*empty"):
        write_t5_tokenizer(tmp_path / "empty", tmp_path / "package")
