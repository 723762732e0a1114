"""AUTOMATIC1111 prompt weighting and long prompts (`prompt_weighting="a1111"`).

The oracle follows A1111's documented semantics, written out by hand per prompt (fragments and weights, chunks
of 75 tokens between start and end tokens, weights multiplied into the hidden state and the chunk's mean kept), and
computes the embeddings with the checkpoint's own transformers text encoders; Diffusers then renders from those
embeddings. Tolerances: embeddings 1e-4 (ONNX Runtime vs PyTorch float32), images 1e-3 (as the pipeline tests).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffrt.errors import InputError  # noqa: E402
from diffrt.runtime import DiffusionPipeline  # noqa: E402
from diffrt.runtime.prompt_chunks import CHUNK_TOKENS, prompt_chunks  # noqa: E402
from diffrt.runtime.prompt_syntax import parse_prompt  # noqa: E402
from diffrt.runtime.tokenizer import CLIPTokenizer  # noqa: E402

EMBED_TOL = 1e-4
IMAGE_TOL = 1e-3

# A1111's own documented examples of its parser (modules/prompt_parser.py docstring), and ours on BREAK
PARSES = {
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", 1.1), (" word", 1.0)],
    "(unbalanced": [("unbalanced", 1.1)],
    "\\(literal\\]": [("(literal]", 1.0)],
    "(unnecessary)(parens)": [("unnecessaryparens", 1.1)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)],
    "[[faded]] (a:0.5) \\\\ back:slash": [("faded", 1 / 1.1 ** 2), (" ", 1.0), ("a", 0.5), (" \\ back:slash", 1.0)],
    "": [("", 1.0)],
}

# (prompt, the chunks A1111's rules make of it, each a list of (text, weight) fragments)
WEIGHTED = "a (red:1.5) cat, ((blue)) [dog] \\(x\\) BREAK sky"
WEIGHTED_CHUNKS = [
    [("a ", 1.0), ("red", 1.5), (" cat, ", 1.0), ("blue", 1.21), (" ", 1.0), ("dog", 1 / 1.1), (" (x)", 1.0)],
    [("sky", 1.0)],
]
NEGATIVE = "(blurry:1.3), lowres"
NEGATIVE_CHUNKS = [[("blurry", 1.3), (", lowres", 1.0)]]


@pytest.mark.parametrize("prompt", sorted(PARSES))
def test_parser_follows_a1111s_documented_examples(prompt):
    got = [(f.text, f.weight) for f in parse_prompt(prompt) if not f.is_break]
    assert [t for t, _ in got] == [t for t, _ in PARSES[prompt]]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in PARSES[prompt]], rtol=1e-12)


def test_break_ends_a_chunk_inside_brackets_too():
    fragments = parse_prompt("(a BREAK b)")
    assert [(f.text, f.is_break) for f in fragments] == [("a", False), ("", True), ("b", False)]
    assert fragments[0].weight == fragments[2].weight == pytest.approx(1.1)


def test_a_factor_that_is_no_number_is_named():
    with pytest.raises(ValueError, match="emphasis factor '1.2.3'"):
        parse_prompt("(cat:1.2.3)")


@pytest.fixture(scope="module")
def sd15(tiny_checkpoint, tiny_package):
    return tiny_checkpoint("sd15"), tiny_package("sd15")


def test_long_prompts_are_cut_into_75_token_chunks_and_commas_keep_phrases_whole(sd15):
    tokenizer = CLIPTokenizer.from_folder(sd15[1] / "tokenizer")
    word = tokenizer.tokens("cat")
    assert len(word) == 1, "the test needs a one-token word"
    chunks = prompt_chunks(tokenizer, " ".join(["cat"] * 160))
    assert chunks.count == 3 and chunks.ids.shape == (3, 77)
    assert [int((row == word[0]).sum()) for row in chunks.ids] == [75, 75, 10]
    assert (chunks.ids[:, 0] == tokenizer.bos_token_id).all() and (chunks.ids[:, -1] == tokenizer.eos_token_id).all()
    # 70 words, a comma, 10 words: the chunk fills 5 tokens after the comma, so those 5 move to the next chunk
    text = " ".join(["cat"] * 70) + ", " + " ".join(["cat"] * 10)
    moved = prompt_chunks(tokenizer, text)
    assert [int((row == word[0]).sum()) for row in moved.ids] == [70, 10]
    assert moved.ids[0, 72] == tokenizer.eos_token_id  # start, 70 words, the comma, then the end token


def test_sd2_pads_chunks_with_its_own_pad_token(tiny_package):
    tokenizer = CLIPTokenizer.from_folder(tiny_package("sd2") / "tokenizer")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = prompt_chunks(tokenizer, "a cat").ids[0]
    expected = tokenizer(["a cat"])[0]  # Diffusers' ids for a short prompt
    np.testing.assert_array_equal(ids, expected)


# ----- the oracle: documented semantics on transformers' encoders -----
def reference_chunk_ids(tokenizer, fragments):
    """[start] + tokens of each fragment (tokenized alone) + [end] + pad to 77, and the weight of each token."""
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, weight in fragments:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    pad = 77 - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad


def reference_embeddings(tokenizer, encoder, chunks, layer=None, count=None):
    """Each chunk encoded alone, the hidden state times the weights, rescaled to its mean; chunks concatenated.
    Returns (embeddings [1, chunks * 77, C], the first chunk's text_embeds or None)."""
    parts, pooled = [], None
    chunks = list(chunks) + [[]] * ((count or len(chunks)) - len(chunks))  # padded with empty chunks
    for fragments in chunks:
        ids, weights = reference_chunk_ids(tokenizer, fragments)
        with torch.no_grad():
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = (out.last_hidden_state if layer is None else out.hidden_states[layer]).numpy()[0].astype(np.float64)
        weighted = z * np.asarray(weights)[:, None]
        parts.append(weighted * (z.mean() / weighted.mean()))
        if pooled is None and hasattr(out, "text_embeds"):
            pooled = out.text_embeds.numpy()
    return np.concatenate(parts)[None].astype(np.float32), pooled


def ours(package):
    pipe = DiffusionPipeline.from_pretrained(package)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd15_weighted_long_prompt_matches_the_documented_semantics(sd15):
    folder, package = sd15
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    assert len(tokenizer("cat", add_special_tokens=False).input_ids) == 1
    sky = len(tokenizer("sky", add_special_tokens=False).input_ids)  # the tiny vocabulary splits it
    long_tail = " ".join(["cat"] * 100)  # the BREAK chunk continues into a third chunk
    prompt = WEIGHTED + " " + long_tail
    fill = 75 - sky
    chunks = [WEIGHTED_CHUNKS[0], [("sky " + " ".join(["cat"] * fill), 1.0)],
              [(" ".join(["cat"] * (100 - fill)), 1.0)]]
    expected, _ = reference_embeddings(tokenizer, encoder, chunks)
    expected_negative, _ = reference_embeddings(tokenizer, encoder, NEGATIVE_CHUNKS, count=3)
    assert expected.shape == (1, 3 * 77, 32)

    from diffrt.runtime.pipelines.weighted_prompts import encode_sd_weighted
    pipe = ours(package)
    embeds, negative = encode_sd_weighted(pipe.prompt_encoder("text_encoder", "tokenizer"), [prompt], [NEGATIVE],
                                          None, None, pipe.max_prompt_chunks())
    np.testing.assert_allclose(embeds, expected, atol=EMBED_TOL)
    np.testing.assert_allclose(negative, expected_negative, atol=EMBED_TOL)
    diffusers_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    diffusers_pipe.set_progress_bar_config(disable=True)
    diffusers_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(diffusers_pipe.scheduler.config)
    kwargs = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
    reference = diffusers_pipe(prompt_embeds=torch.from_numpy(expected),
                               negative_prompt_embeds=torch.from_numpy(expected_negative),
                               generator=torch.Generator("cpu").manual_seed(5), **kwargs).images
    from diffrt import schedulers
    pipe.scheduler = schedulers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    got = pipe(prompt, negative_prompt=NEGATIVE, prompt_weighting="a1111", generator=5, **kwargs).images
    assert float(np.abs(reference - got).max()) <= IMAGE_TOL


def test_plain_short_prompts_give_exactly_diffusers_embeddings(sd15):
    pipe = ours(sd15[1])
    kwargs = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "num_inference_steps": 2, "height": 64,
              "width": 64, "output_type": "np", "generator": 1}
    np.testing.assert_array_equal(pipe(prompt_weighting="a1111", **kwargs).images, pipe(**kwargs).images)


def test_sdxl_weighted_prompt_uses_both_encoders_and_the_first_chunks_pooled_embedding(tiny_checkpoint,
                                                                                      tiny_package):
    folder, package = tiny_checkpoint("sdxl"), tiny_package("sdxl")
    tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder / f) for f in ("tokenizer", "tokenizer_2")]
    encoders = [transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").eval()]
    sides = {}
    for name, chunks in (("prompt", WEIGHTED_CHUNKS), ("negative", NEGATIVE_CHUNKS)):
        parts = [reference_embeddings(t, e, chunks, layer=-2, count=2) for t, e in zip(tokenizers, encoders)]
        sides[name] = (np.concatenate([p[0] for p in parts], axis=-1), parts[1][1])
    diffusers_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    diffusers_pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
    reference = diffusers_pipe(
        prompt_embeds=torch.from_numpy(sides["prompt"][0]), pooled_prompt_embeds=torch.from_numpy(sides["prompt"][1]),
        negative_prompt_embeds=torch.from_numpy(sides["negative"][0]),
        negative_pooled_prompt_embeds=torch.from_numpy(sides["negative"][1]),
        generator=torch.Generator("cpu").manual_seed(2), **kwargs).images
    got = ours(package)(WEIGHTED, negative_prompt=NEGATIVE, prompt_weighting="a1111", generator=2, **kwargs).images
    assert float(np.abs(reference - got).max()) <= IMAGE_TOL


def test_a_prompt_longer_than_the_unet_takes_is_refused_before_encoding(sd15):
    pipe = ours(sd15[1])
    limit = pipe.max_prompt_chunks()
    assert limit == 8  # what diffrt exports: 8 x 77 tokens
    too_long = " ".join(["cat"] * (CHUNK_TOKENS * limit + 1))
    with pytest.raises(InputError, match=rf"`negative_prompt` needs {limit + 1} chunks .* at most {limit}"):
        pipe("a cat", negative_prompt=too_long, prompt_weighting="a1111", num_inference_steps=1)
    with pytest.raises(ValueError, match="prompt_weighting"):
        pipe("a cat", prompt_weighting="compel", num_inference_steps=1)


def test_plain_long_prompts_equal_compels_chunks(sd15):
    """Where compel's convention and A1111's coincide (no weights, no commas to backtrack to), the embeddings agree:
    75-token chunks, each between its own start and end token, encoded alone and concatenated."""
    from compel import Compel

    folder, package = sd15
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    prompt = " ".join(["a cat sitting on a red mat"] * 20)
    with torch.no_grad():
        expected = Compel(tokenizer=tokenizer, text_encoder=encoder, truncate_long_prompts=False)(prompt).numpy()
    embeds, _ = ours(package).encode_prompt(prompt, None, 1, False, prompt_weighting="a1111")
    assert embeds.shape == expected.shape and embeds.shape[1] > 2 * 77
    np.testing.assert_allclose(embeds, expected, atol=EMBED_TOL)
