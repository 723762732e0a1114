"""diffrt's CLIPTokenizer against transformers' CLIPTokenizer on the tiny checkpoints' real BPE tokenizer folders."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffrt.errors import InputError, PackageError
from diffrt.runtime.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

LONG_PROMPT = " ".join(["a painting of an astronaut riding a horse on the moon"] * 12)  # > 77 tokens
PROMPTS = [
    "",
    "a photo of a cat sitting on a red chair",
    "A PHOTO Of a Cat, High Quality",
    "   extra   spaces\tand\ttabs\nand newlines   ",
    "naïve café über 東京 😺 Ünïcödé",
    "cafe\u0301 nai\u0308ve Ü\u0301",  # combining accents: NFC-normalised before BPE
    "punctuation!!! ... ??? (a:1.2) [b] {c} #tag @user $5 100% a&b",
    "it's they're we've I'm you'll he'd",
    "the digit 7, 1234567890 and 3.14159",
    "<|startoftext|> special tokens in text <|endoftext|>",
    "hello!world!",
    LONG_PROMPT,
    "x" * 400,
]
KINDS = {"sd15": "tokenizer", "sd2": "tokenizer", "sdxl": "tokenizer_2"}


def ensure_tokenizer_json(folder: Path, workdir: Path) -> Path:
    """The fixture folder if it has tokenizer.json, else a copy with one written by transformers' fast tokenizer."""
    if (folder / "tokenizer.json").is_file():
        return folder
    target = workdir / f"{folder.parent.name}_{folder.name}_json"
    transformers.CLIPTokenizerFast.from_pretrained(folder).save_pretrained(target)
    return target


def optimum_layout(folder: Path, target: Path) -> Path:
    """A tokenizer folder as Optimum ships it: vocab.json + merges.txt + configs, no tokenizer.json."""
    target.mkdir(parents=True, exist_ok=True)
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (target / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    pad = config.pop("pad_token")  # the pad token then comes from special_tokens_map.json, as in older exports
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    special = {"pad_token": {"content": pad, "lstrip": False, "normalized": False, "rstrip": False}}
    (target / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    return target


@pytest.fixture(scope="module", params=sorted(KINDS))
def folders(request: pytest.FixtureRequest, tiny_checkpoint, tmp_path_factory) -> tuple[str, Path, Path]:
    """(kind, folder with tokenizer.json, Optimum-style folder without it)."""
    workdir = tmp_path_factory.mktemp(f"tok_{request.param}")
    folder = ensure_tokenizer_json(tiny_checkpoint(request.param) / KINDS[request.param], workdir)
    return request.param, folder, optimum_layout(folder, workdir / "optimum")


@pytest.fixture(scope="module")
def reference(folders):
    return transformers.CLIPTokenizer.from_pretrained(folders[1])


def hf_ids(tokenizer, texts, **kwargs) -> np.ndarray:
    kwargs = {"padding": "max_length", "max_length": 77, "truncation": True, **kwargs}
    return np.asarray(tokenizer(texts, **kwargs).input_ids, dtype=np.int64)


@pytest.mark.parametrize("layout", ["tokenizer_json", "vocab_merges"])
def test_ids_match_transformers_for_every_prompt(folders, reference, layout: str) -> None:
    kind, folder, optimum = folders
    ours = CLIPTokenizer.from_folder(folder if layout == "tokenizer_json" else optimum)
    for prompt in PROMPTS:
        np.testing.assert_array_equal(ours(prompt), hf_ids(reference, [prompt]), err_msg=f"{kind}: {prompt!r}")
    batch = ours(PROMPTS)
    assert batch.dtype == np.int64 and batch.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(batch, hf_ids(reference, PROMPTS))


def test_special_token_ids_and_lengths_match_transformers(folders, reference) -> None:
    kind, folder, optimum = folders
    for path in (folder, optimum):
        ours = CLIPTokenizer.from_folder(path)
        assert ours.model_max_length == reference.model_max_length == 77
        assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (
            reference.pad_token_id, reference.eos_token_id, reference.bos_token_id
        )
    expected_pad = "!" if kind in ("sd2", "sdxl") else "<|endoftext|>"
    assert reference.pad_token == expected_pad and ours.special_tokens["pad_token"] == expected_pad


def test_rows_are_padded_with_the_pad_token_after_the_end_token(folders) -> None:
    kind, folder, _ = folders
    ours = CLIPTokenizer.from_folder(folder)
    ids = ours("a cat")
    end = int(np.flatnonzero(ids[0] == ours.eos_token_id)[0])
    assert ids[0, 0] == ours.bos_token_id
    assert np.all(ids[0, end + 1 :] == ours.pad_token_id)
    if kind != "sd15":
        assert ours.pad_token_id != ours.eos_token_id  # "!" padding


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60), min_size=1,
                max_size=3))
def test_random_text_matches_transformers(folders, reference, texts: list[str]) -> None:
    ours = CLIPTokenizer.from_folder(folders[2])  # the vocab + merges build: the one not read from a file
    np.testing.assert_array_equal(ours(texts), hf_ids(reference, texts))


def test_other_lengths_and_longest_padding_match_transformers(folders, reference) -> None:
    ours = CLIPTokenizer.from_folder(folders[1])
    np.testing.assert_array_equal(ours(PROMPTS, max_length=10), hf_ids(reference, PROMPTS, max_length=10))
    longest = hf_ids(reference, PROMPTS[:4], padding="longest")
    np.testing.assert_array_equal(ours(PROMPTS[:4], padding="longest"), longest)
    np.testing.assert_array_equal(ours.untruncated_ids(PROMPTS), hf_ids(reference, PROMPTS, padding="longest",
                                                                         truncation=False, max_length=None))


def test_truncation_logs_the_cut_off_text_like_diffusers(folders, reference, caplog) -> None:
    ours = CLIPTokenizer.from_folder(folders[1])
    long_prompt = LONG_PROMPT + " in the snow"
    caplog.set_level(logging.WARNING, logger="diffrt.runtime.tokenizer")
    ids = ours([long_prompt, "short"])
    assert ids.shape == (2, 77) and ids[0, -1] == ours.eos_token_id
    untruncated = hf_ids(reference, [long_prompt], padding="longest", truncation=False, max_length=None)
    removed = reference.batch_decode(untruncated[:, 76:-1])  # what Diffusers' encode_prompt logs
    assert "The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens" \
        in caplog.text
    assert str(removed) in caplog.text and removed[0].endswith("in the snow")
    caplog.clear()
    ours(["short"])
    assert "truncated" not in caplog.text


def test_argument_errors_name_the_argument(folders) -> None:
    ours = CLIPTokenizer.from_folder(folders[1])
    with pytest.raises(InputError, match="`texts` must be a string or a non-empty list of strings; got int 3"):
        ours(3)
    with pytest.raises(InputError, match="`texts` must be a string or a non-empty list of strings"):
        ours(["ok", None])
    with pytest.raises(InputError, match="`max_length` must be an integer >= 3; got 1"):
        ours("a", max_length=1)
    with pytest.raises(InputError, match="`padding` must be one of max_length, longest; got 'do_not_pad'"):
        ours("a", padding="do_not_pad")


def test_folder_errors_name_the_file(folders, tmp_path: Path) -> None:
    _, folder, optimum = folders
    with pytest.raises(PackageError, match="tokenizer folder .*missing_dir does not exist"):
        CLIPTokenizer.from_folder(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError, match="needs tokenizer.json, or vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path / "empty")
    broken = shutil.copytree(optimum, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(PackageError, match=r"tokenizer_config.json is not valid JSON"):
        CLIPTokenizer.from_folder(broken)
    corrupt = shutil.copytree(folder, tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(PackageError, match=r"tokenizer.json is not a valid tokenizers file"):
        CLIPTokenizer.from_folder(corrupt)
    no_eos = shutil.copytree(optimum, tmp_path / "no_eos")
    (no_eos / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(PackageError, match=r"the eos_token '<\|nope\|>' is not in the vocabulary"):
        CLIPTokenizer.from_folder(no_eos)
