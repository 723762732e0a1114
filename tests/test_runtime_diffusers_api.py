"""The Diffusers pipeline object around `__call__`, compared with Diffusers' own pipeline on the same checkpoint.

Numbers: embeddings within 1e-5 (ONNX Runtime vs PyTorch float32), images within 1e-3 on [0, 1] as the parity
tests (tests/test_runtime_pipelines.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffrt import schedulers as ours  # noqa: E402
from diffrt.runtime import DiffusionPipeline, StableDiffusionImg2ImgPipeline  # noqa: E402
from diffrt.runtime.pipelines.components import ConfigDict  # noqa: E402

PROMPT = "a photo of a cat sitting on a red chair"
EMBED_TOL = 1e-5
IMAGE_TOL = 1e-3
# Diffusers components that are torch modules with no package counterpart (the safety checker is not exported)
TORCH_ONLY = {"safety_checker", "feature_extractor", "image_encoder"}

_cache: dict = {}


def pipes(kind, tiny_checkpoint, tiny_package):
    """(diffusers pipeline, diffrt pipeline) on the same tiny checkpoint, built once per module."""
    if kind not in _cache:
        ref = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(kind))
        ref.set_progress_bar_config(disable=True)
        pipe = DiffusionPipeline.from_pretrained(tiny_package(kind))
        pipe.set_progress_bar_config(disable=True)
        _cache[kind] = (ref, pipe)
    return _cache[kind]


def close(expected, got, tol):
    expected = expected.detach().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    assert expected.shape == got.shape
    diff = float(np.abs(expected - got).max())
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol:.0e}"


# ----- components, config, device -----
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_components_have_diffusers_names_and_configs(kind, tiny_checkpoint, tiny_package):
    ref, pipe = pipes(kind, tiny_checkpoint, tiny_package)
    assert set(pipe.components) == set(ref.components) - TORCH_ONLY
    assert pipe.components["scheduler"] is pipe.scheduler and pipe.components["unet"] is pipe.unet
    for key in ("sample_size", "in_channels", "cross_attention_dim", "time_cond_proj_dim"):
        assert pipe.unet.config.get(key) == ref.unet.config.get(key)
    assert pipe.unet.config.sample_size == ref.unet.config.sample_size  # attribute access, as on a FrozenDict
    assert pipe.vae.config.scaling_factor == ref.vae.config.scaling_factor
    assert pipe.vae_scale_factor == ref.vae_scale_factor
    assert pipe.config["_class_name"] == type(ref).__name__ == pipe.config._class_name
    settings = {k: v for k, v in ref.config.items()
                if not k.startswith("_") and not isinstance(v, (list, tuple)) and k in pipe.config}
    assert settings == {k: pipe.config[k] for k in settings}  # e.g. SDXL's force_zeros_for_empty_prompt
    assert pipe.text_encoder is not None
    assert pipe.text_encoder.config["hidden_size"] == ref.text_encoder.config.hidden_size
    with pytest.raises(TypeError):
        pipe.unet.config["sample_size"] = 1
    assert not pipe._engines, "reading components and configs must not create engines"


@pytest.mark.parametrize(("kind", "names"), [("sd15", ["tokenizer"]), ("sdxl", ["tokenizer", "tokenizer_2"])])
def test_tokenizers_give_the_ids_of_diffusers_tokenizers(kind, names, tiny_checkpoint, tiny_package):
    ref, pipe = pipes(kind, tiny_checkpoint, tiny_package)
    for name in names:
        theirs, mine = getattr(ref, name), getattr(pipe, name)
        expected = theirs([PROMPT, "!"], padding="max_length", max_length=theirs.model_max_length,
                          truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(mine([PROMPT, "!"], max_length=mine.model_max_length), expected)


def test_unet_component_runs_its_engine(tiny_checkpoint, tiny_package):
    ref, pipe = pipes("sd15", tiny_checkpoint, tiny_package)
    sample = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    embeds = np.random.default_rng(1).standard_normal((1, 77, 32)).astype(np.float32)
    out = pipe.unet(sample=sample, timestep=np.array([500.0], np.float32), encoder_hidden_states=embeds)
    with torch.no_grad():
        expected = ref.unet(torch.from_numpy(sample), 500, encoder_hidden_states=torch.from_numpy(embeds)).sample
    close(expected, out["out_sample"], EMBED_TOL * 10)


def test_vae_decode_and_encode_match_diffusers_autoencoder(tiny_checkpoint, tiny_package):
    ref, pipe = pipes("sd15", tiny_checkpoint, tiny_package)
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = ref.vae.decode(torch.from_numpy(latents)).sample
        image = expected.clamp(-1, 1)
        dist = ref.vae.encode(image).latent_dist
    close(expected, pipe.vae.decode(latents).sample, 1e-4)
    mine = pipe.vae.encode(image.numpy()).latent_dist
    close(dist.mean, mine.mean, 1e-4)
    close(dist.std, mine.std, 1e-4)
    sampled = dist.sample(torch.Generator("cpu").manual_seed(3))
    from diffrt.rng import Generator

    close(sampled, mine.sample(Generator("cpu").manual_seed(3)), 1e-4)


def test_device_and_to(tiny_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"), load="eager")
    assert pipe.device == "cpu" and pipe._engines
    assert pipe.to("cpu") is pipe and not pipe._engines, "to() starts over with the new provider's engines"
    with pytest.raises(ValueError, match="dtype"):
        pipe.to("cpu", dtype="float16")
    with pytest.raises(ValueError, match="provider"):
        pipe.to("cuda:x")
    with pytest.raises(ValueError, match="nope|provider"):
        pipe.to("nope")
    assert pipe.provider == "cpu"


def test_to_cuda_sets_the_provider_and_device_id(tiny_package):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="cuda|CUDA"):
            DiffusionPipeline.from_pretrained(tiny_package("sd15")).to("cuda")
        return
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15")).to("cuda:0")
    assert pipe.device == "cuda:0" and pipe.engine_options["device_id"] == 0


# ----- encode_prompt -----
@pytest.mark.parametrize("cfg", [True, False])
def test_sd_encode_prompt_returns_what_diffusers_returns(cfg, tiny_checkpoint, tiny_package):
    ref, pipe = pipes("sd15", tiny_checkpoint, tiny_package)
    args = ([PROMPT, "a dog"], "cpu", 2, cfg)
    with torch.no_grad():
        expected = ref.encode_prompt(*args, negative_prompt=["blurry", "dark"])
    got = pipe.encode_prompt(*args, negative_prompt=["blurry", "dark"])
    close(expected[0], got[0], EMBED_TOL)
    if cfg:
        close(expected[1], got[1], EMBED_TOL)
    else:
        assert expected[1] is None and got[1] is None
    # given embeddings, as keywords (clip_skip: Diffusers 0.42's encode_prompt fails with transformers 5; it is
    # compared layer by layer in test_runtime_pipelines.py)
    embeds = got[0][:1]
    with torch.no_grad():
        expected = ref.encode_prompt(None, "cpu", 1, True, prompt_embeds=torch.from_numpy(embeds))
    got = pipe.encode_prompt(None, prompt_embeds=embeds)
    close(expected[0], got[0], EMBED_TOL)
    close(expected[1], got[1], EMBED_TOL)


def test_sdxl_encode_prompt_returns_what_diffusers_returns(tiny_checkpoint, tiny_package):
    ref, pipe = pipes("sdxl", tiny_checkpoint, tiny_package)
    for kwargs in ({}, {"negative_prompt": "blurry", "prompt_2": "an owl"}, {"do_classifier_free_guidance": False}):
        with torch.no_grad():
            expected = ref.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=2, **kwargs)
        got = pipe.encode_prompt(PROMPT, num_images_per_prompt=2, **kwargs)
        assert len(got) == 4
        for theirs, mine in zip(expected, got):
            if theirs is None:
                assert mine is None
            else:
                close(theirs, mine, EMBED_TOL)


def test_encode_prompt_checks_its_arguments_by_name(tiny_checkpoint, tiny_package):
    _, pipe = pipes("sd15", tiny_checkpoint, tiny_package)
    with pytest.raises(ValueError, match="lora_scale"):
        pipe.encode_prompt(PROMPT, lora_scale=0.5)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe.encode_prompt(None, prompt_embeds=np.zeros((1, 77, 31), np.float32))


# ----- the call's state: num_timesteps, interrupt, progress bar -----
def test_num_timesteps_is_the_count_diffusers_reports(tiny_checkpoint, tiny_package):
    ref, _ = pipes("sd15", tiny_checkpoint, tiny_package)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(ref)
    ref.set_progress_bar_config(disable=True)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_package("sd15"))
    pipe.set_progress_bar_config(disable=True)
    image = np.full((1, 64, 64, 3), 0.5, np.float32)
    kwargs = {"prompt": PROMPT, "image": image, "strength": 0.5, "num_inference_steps": 10, "output_type": "latent"}
    ref(**kwargs)
    steps: list[int] = []
    pipe(**kwargs, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert pipe.num_timesteps == ref.num_timesteps == len(steps) < 10


def test_interrupt_from_a_callback_stops_the_loop_as_in_diffusers(tiny_checkpoint, tiny_package):
    """Diffusers' docs example: `pipe._interrupt = True` in `callback_on_step_end` at some step."""
    ref, pipe = pipes("sd15", tiny_checkpoint, tiny_package)
    seen: dict[str, list] = {"theirs": [], "mine": []}

    def callback(side):
        def stop(p, i, t, callback_kwargs):
            seen[side].append(i)
            if i == 1:
                p._interrupt = True
            return callback_kwargs
        return stop

    kwargs = {"prompt": PROMPT, "num_inference_steps": 5, "height": 64, "width": 64, "output_type": "np"}
    expected = ref(generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=callback("theirs"),
                   **kwargs).images
    got = pipe(generator=0, callback_on_step_end=callback("mine"), **kwargs).images
    assert seen["mine"] == seen["theirs"] == [0, 1]
    assert pipe.interrupt is True
    close(expected, got, IMAGE_TOL)
    full = pipe(generator=0, **kwargs).images  # the next call starts uninterrupted
    assert pipe.interrupt is False and np.abs(full - got).max() > 0.01


def test_progress_bar_and_its_config(tiny_checkpoint, tiny_package):
    _, pipe = pipes("sd15", tiny_checkpoint, tiny_package)
    pipe.set_progress_bar_config(disable=True, desc="denoising")
    with pipe.progress_bar(total=3) as bar:
        assert bar.total == 3 and bar.disable
    assert list(pipe.progress_bar(range(4))) == [0, 1, 2, 3]
    pipe.set_progress_bar_config(disable=True)


# ----- save_pretrained and from_pipe -----
def test_save_pretrained_writes_a_package_that_loads_with_the_current_scheduler(tiny_package, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = ours.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
    expected = pipe(generator=4, **kwargs).images
    saved = pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["scheduler"][1] == "EulerAncestralDiscreteScheduler"
    again = DiffusionPipeline.from_pretrained(saved)
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    np.testing.assert_array_equal(again(generator=4, **kwargs).images, expected)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"
    pipe.save_pretrained(saved)  # a model package may be replaced


def test_save_pretrained_never_replaces_a_folder_of_other_files_or_the_package_itself(tiny_package, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"))
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("keep me")
    with pytest.raises(ValueError, match="documents"):
        pipe.save_pretrained(mine)
    assert (mine / "thesis.txt").read_text() == "keep me"
    for target in (tiny_package("sd15"), tiny_package("sd15") / "unet", tiny_package("sd15").parent):
        with pytest.raises(ValueError, match="save_directory"):
            pipe.save_pretrained(target)
    assert (tiny_package("sd15") / "unet" / "model.onnx").is_file()


def test_from_pipe_on_a_concrete_class_shares_the_engines(tiny_package):
    pipe = DiffusionPipeline.from_pretrained(tiny_package("sd15"), load="eager")
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert isinstance(img2img, StableDiffusionImg2ImgPipeline)
    assert img2img._engines is pipe._engines and img2img.scheduler is pipe.scheduler


def test_config_dict_reads_like_a_frozen_dict():
    config = ConfigDict({"sample_size": 8})
    assert config.sample_size == 8 and dict(config) == {"sample_size": 8}
    with pytest.raises(AttributeError):
        _ = config.missing
    with pytest.raises(TypeError):
        config.update(sample_size=9)
