"""Textual inversion on exported packages, torch-free, against Diffusers' `load_textual_inversion` (issue #15).

Embedding files are written here in each format (A1111 `emb_params`, SDXL `clip_l` / `clip_g`, Diffusers'
`learned_embeds.safetensors`) from random vectors of the tiny encoders' width; Diffusers loads the same files.
Tolerance: max abs diff <= 1e-3 on images in [0, 1]; after unloading, the base image exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from test_lora import assert_close, ours, reference  # noqa: E402

from diffrt.errors import InputError  # noqa: E402

HIDDEN = 32  # tests/checkpoint_fixtures.py CLIP_HIDDEN
CALL = dict(num_inference_steps=3, height=64, width=64, output_type="np")
PROMPT = "a photo of <cat-toy> on a chair"


def vectors(count, seed, width=HIDDEN):
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


def image_of(pipe, prompt=PROMPT):
    generator = torch.Generator().manual_seed(0) if isinstance(pipe, diffusers.DiffusionPipeline) else 0
    return np.asarray(pipe(prompt, generator=generator, **CALL).images)


def test_a1111_multi_vector_embedding_matches_diffusers(tiny_checkpoint, tiny_package, tmp_path):
    path = tmp_path / "cat-toy.safetensors"
    safetensors_numpy.save_file({"emb_params": vectors(3, 1)}, str(path))
    ref = reference(tiny_checkpoint, "sd15")
    ref.load_textual_inversion(str(path), token="<cat-toy>")
    pipe = ours(tiny_package, "sd15")
    pipe.load_textual_inversion(path, token="<cat-toy>")
    # the three tokens get the ids Diffusers' tokenizer gives them, and the prompt is written out the same way
    ids = ref.tokenizer(ref.maybe_convert_prompt(PROMPT, ref.tokenizer)).input_ids
    assert pipe.tokenizer.encode(PROMPT) == ids
    assert_close(image_of(ref), image_of(pipe))
    assert float(np.abs(image_of(pipe) - image_of(ours(tiny_package, "sd15"))).max()) > 1e-2


def test_diffusers_learned_embeds_take_the_token_from_the_file(tiny_checkpoint, tiny_package, tmp_path):
    folder = tmp_path / "sks"
    folder.mkdir()
    safetensors_numpy.save_file({"<sks>": vectors(1, 2)[0]}, str(folder / "learned_embeds.safetensors"))
    ref = reference(tiny_checkpoint, "sd15")
    ref.load_textual_inversion(str(folder))
    pipe = ours(tiny_package, "sd15")
    pipe.load_textual_inversion(folder)
    assert_close(image_of(ref, "a <sks> dog"), image_of(pipe, "a <sks> dog"))


def test_sdxl_clip_l_and_clip_g_embedding_matches_diffusers(tiny_checkpoint, tiny_package, tmp_path):
    clip_l, clip_g = vectors(2, 3), vectors(2, 4)
    path = tmp_path / "sdxl-emb.safetensors"
    safetensors_numpy.save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    ref = reference(tiny_checkpoint, "sdxl")
    ref.load_textual_inversion(torch.from_numpy(clip_l), token="<cat-toy>", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(torch.from_numpy(clip_g), token="<cat-toy>", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    pipe = ours(tiny_package, "sdxl")
    pipe.load_textual_inversion(path, token="<cat-toy>")  # both encoders from the one A1111 file
    assert_close(image_of(ref), image_of(pipe))
    other = ours(tiny_package, "sdxl")  # Diffusers' way: one encoder per call
    other.load_textual_inversion(path, token="<cat-toy>", text_encoder=other.text_encoder, tokenizer=other.tokenizer)
    other.load_textual_inversion(path, token="<cat-toy>", text_encoder=other.text_encoder_2,
                                 tokenizer=other.tokenizer_2)
    np.testing.assert_array_equal(image_of(other), image_of(pipe))


def test_unloading_gives_the_base_image_exactly(tiny_package, tmp_path):
    path = tmp_path / "cat-toy.safetensors"
    safetensors_numpy.save_file({"emb_params": vectors(2, 5)}, str(path))
    pipe = ours(tiny_package, "sd15", load="eager")
    base = image_of(pipe)
    unet = pipe._engines["unet"]
    pipe.load_textual_inversion(path, token="<cat-toy>")
    assert pipe._engines["unet"] is unet  # only the text encoder's weights changed
    assert not np.array_equal(image_of(pipe), base)
    pipe.unload_textual_inversion()
    np.testing.assert_array_equal(image_of(pipe), base)
    assert pipe.tokenizer.vocab_size == ours(tiny_package, "sd15").tokenizer.vocab_size


def test_bad_embeddings_are_refused_with_the_reason(tiny_package, tmp_path):
    pipe = ours(tiny_package, "sd15")
    wide = tmp_path / "wide.safetensors"
    safetensors_numpy.save_file({"emb_params": vectors(1, 6, width=HIDDEN * 2)}, str(wide))
    with pytest.raises(InputError, match="64 values; text_encoder takes 32"):
        pipe.load_textual_inversion(wide, token="<w>")
    pipe.load_textual_inversion(vectors(1, 7), token="<one>")
    with pytest.raises(InputError, match="token"):
        pipe.load_textual_inversion(vectors(1, 8), token="<one>")
    with pytest.raises(InputError, match="token"):
        pipe.load_textual_inversion(vectors(1, 8), token="cat</w>" if pipe.tokenizer.token_id("cat</w>") else "a</w>")
    nan = vectors(1, 9)
    nan[0, 0] = np.nan
    with pytest.raises(InputError, match="finite"):
        pipe.load_textual_inversion(nan, token="<nan>")


def test_openvino_takes_the_new_token_embeddings(tiny_checkpoint, tiny_package, tmp_path):
    """The token embedding grows by the new tokens: OpenVINO's swapped constant has more rows than the file's."""
    pytest.importorskip("openvino")
    path = tmp_path / "cat-toy.safetensors"
    safetensors_numpy.save_file({"emb_params": vectors(2, 4)}, str(path))
    ref = reference(tiny_checkpoint, "sd15")
    ref.load_textual_inversion(str(path), token="<cat-toy>")
    pipe = ours(tiny_package, "sd15", provider="openvino")
    pipe.load_textual_inversion(path, token="<cat-toy>")
    assert_close(image_of(ref), image_of(pipe))
