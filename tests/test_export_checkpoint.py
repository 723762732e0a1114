"""resolve_source: local diffusers folders, the Hub cache (offline), and original-layout single files.

Oracles: the tiny diffusers folders themselves (a single file written from a folder must convert back to exactly
its tensors), diffusers' own `single_file_utils` conversion of the same file, and published model configs for
real-size architectures (built on the meta device, so no memory is spent).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402
from single_file_writer import TEXT_LAYOUTS, to_original, write_single_file  # noqa: E402

from diffrt.errors import ConfigError, ExportError, InputError  # noqa: E402
from diffrt.export.checkpoint import hub_patterns, read_components, resolve_source  # noqa: E402
from diffrt.export.single_file import plan_from_shapes, plan_single_file  # noqa: E402
from diffrt.export.single_file_unet import take_shape  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ["sd15", "sd2", "sdxl", "sdxl_refiner", "sd_inpaint"]
MODEL_TYPES = {"sd15": "v1", "sd2": "v2", "sdxl": "xl_base", "sdxl_refiner": "xl_refiner", "sd_inpaint": "inpainting"}
# What tiny widths (< 64) hide from the weights: head counts, VAE group count; sample sizes are the fixtures'.
TINY_OVERRIDES = {
    "unet": {"sample_size": 8}, "vae": {"norm_num_groups": 8, "sample_size": 64},
    "text_encoder": {"num_attention_heads": 4}, "text_encoder_2": {"num_attention_heads": 4},
}
TINY_HEADS = {"sd2": [2, 4], "sdxl": [2, 4], "sdxl_refiner": [2, 4]}  # per-level heads; SD 1.x: 8 everywhere


def tiny_overrides(kind: str) -> dict[str, dict]:
    overrides = {name: dict(values) for name, values in TINY_OVERRIDES.items()}
    if kind in TINY_HEADS:
        overrides["unet"]["attention_head_dim"] = TINY_HEADS[kind]
    if kind == "sdxl_refiner":
        del overrides["text_encoder"]
    elif not kind.startswith("sdxl"):
        del overrides["text_encoder_2"]
    return overrides


def transformers_layout(state: dict) -> dict:
    """CLIPTextModel keys with the `text_model.` prefix (transformers >= 5.6 saves them without it)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def assert_same_tensors(ours: dict, reference: dict, what: str) -> None:
    assert sorted(ours) == sorted(reference), f"{what}: key sets differ"
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), f"{what}: {key} differs"


@pytest.fixture(scope="module")
def single_files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single_files")
    return {kind: write_single_file(tiny_checkpoint(kind), kind, out / f"{kind}.safetensors") for kind in KINDS}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diffrt_cache")


@pytest.fixture(scope="module")
def variant_folder(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny SD 1.x pipeline saved twice into one folder: default fp32 weights and an fp16 variant."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("variant") / "sd15"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_checkpoint("sd15"))
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder


# --- single files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_single_file_converts_back_to_the_exact_diffusers_tensors(kind, single_files, tiny_checkpoint, cache_dir):
    folder = tiny_checkpoint(kind)
    source = resolve_source(single_files[kind], config_folder=folder, cache_dir=cache_dir)
    index = json.loads((folder / "model_index.json").read_text())
    assert (source.kind, source.id, source.model_type) == ("single_file", str(single_files[kind]), MODEL_TYPES[kind])
    assert source.pipeline_class == index["_class_name"] and source.revision is None
    assert source.components == read_components(index, folder / "model_index.json")
    expected_weights = sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.safetensors"))
    assert sorted(source.weight_files) == expected_weights
    for relative, path in source.weight_files.items():
        reference = load_file(folder / relative)
        ours = load_file(path)
        if relative.startswith("text_encoder"):
            ours, reference = transformers_layout(ours), transformers_layout(reference)
        assert_same_tensors(ours, reference, relative)
    for name in ("unet", "vae", "scheduler"):
        config = "scheduler_config.json" if name == "scheduler" else "config.json"
        assert json.loads((source.path / name / config).read_text()) == json.loads((folder / name / config).read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_agrees_with_diffusers_single_file_conversion(kind, single_files, tiny_checkpoint, cache_dir):
    """Independent oracle for writer and reader: diffusers' `single_file_utils` on the same file."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModelWithProjection

    folder = tiny_checkpoint(kind)
    source = resolve_source(single_files[kind], config_folder=folder, cache_dir=cache_dir)
    checkpoint = load_file(single_files[kind])
    configs = {n: json.loads((folder / n / "config.json").read_text()) for n in ("unet", "vae")}
    theirs = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
              "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, configs["vae"])}
    for component, prefix, layout in TEXT_LAYOUTS[kind]:
        if layout == "clip":
            converted = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        else:  # diffusers wants a model instance (for its hidden size); a randomly initialised one will do
            model = CLIPTextModelWithProjection._from_config(
                CLIPTextModelWithProjection.config_class.from_pretrained(folder / component))
            converted = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        theirs[component] = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    for component, state in theirs.items():
        ours = load_file(source.path / component / ("model.safetensors" if "text" in component
                                                    else "diffusion_pytorch_model.safetensors"))
        assert_same_tensors(ours, state, f"{kind}/{component}")


def test_materialized_folder_loads_with_diffusers_and_transformers(single_files, tiny_checkpoint, cache_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = tiny_checkpoint("sdxl")
    source = resolve_source(single_files["sdxl"], config_folder=folder, cache_dir=cache_dir)
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    for name, cls in classes.items():
        ours = cls.from_pretrained(source.path / name).state_dict()
        assert_same_tensors(ours, cls.from_pretrained(folder / name).state_dict(), name)


@pytest.mark.parametrize("kind", KINDS)
def test_configs_inferred_from_key_shapes_match_the_folder(kind, single_files, tiny_checkpoint):
    folder = tiny_checkpoint(kind)
    plan = plan_single_file(single_files[kind], config_overrides=tiny_overrides(kind))
    assert plan.model_type == MODEL_TYPES[kind]
    assert plan.pipeline_class == json.loads((folder / "model_index.json").read_text())["_class_name"]
    # token ids: the Hub's legacy 0/2/1 (argmax pooling); scaling factor: the real SDXL VAE's, not the fixture's
    not_inferred = {"bos_token_id", "eos_token_id", "pad_token_id", "dtype", "transformers_version"}
    if kind.startswith("sdxl"):
        not_inferred.add("scaling_factor")
    for name in plan.configs:
        if name == "scheduler":
            continue
        reference = json.loads((folder / name / "config.json").read_text())
        for key, value in reference.items():
            if not key.startswith("_") and key not in not_inferred:
                assert plan.configs[name].get(key) == value, f"{kind} {name} `{key}`"
    assert plan.configs["vae"]["scaling_factor"] == (0.13025 if kind.startswith("sdxl") else 0.18215)


def test_original_config_gives_heads_parameterisation_and_schedule(single_files):
    original = {"model": {"params": {"parameterization": "v", "scale_factor": 0.5, "linear_start": 0.001,
                                     "unet_config": {"params": {"num_head_channels": 16}}}}}
    overrides = tiny_overrides("sd2")
    del overrides["unet"]["attention_head_dim"]
    plan = plan_single_file(single_files["sd2"], original_config=original, config_overrides=overrides)
    assert plan.configs["unet"]["attention_head_dim"] == [32 // 16, 64 // 16]
    assert plan.configs["scheduler"]["prediction_type"] == "v_prediction"
    assert plan.configs["scheduler"]["beta_start"] == 0.001 and plan.configs["vae"]["scaling_factor"] == 0.5
    epsilon = plan_single_file(single_files["sd2"], config_overrides=tiny_overrides("sd2"), prediction_type="epsilon")
    assert epsilon.configs["scheduler"]["prediction_type"] == "epsilon"


# Published diffusers configs (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu")
PUBLISHED = {
    "sd15": {"unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
                          attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                          up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=64),
             "text_encoder": CLIP_L},
    "sd2": {"unet": dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
                         attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                         down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                         up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, sample_size=96),
            # OpenCLIP ViT-H keeps all 24 layers here (diffusers' folder drops the last one)
            "text_encoder": dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, hidden_act="gelu")},
    "sdxl": {"unet": dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
                          attention_head_dim=[5, 10, 20], use_linear_projection=True,
                          transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time",
                          addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], sample_size=128),
             "text_encoder": CLIP_L,
             "text_encoder_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                    num_attention_heads=20, hidden_act="gelu", projection_dim=1280)},
}
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def _meta_components(kind: str) -> dict[str, tuple[dict, dict]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**PUBLISHED[kind]["unet"]), "vae": AutoencoderKL(**SD_VAE)}
        for name in ("text_encoder", "text_encoder_2"):
            if name in PUBLISHED[kind]:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                components[name] = cls(CLIPTextConfig(max_position_embeddings=77, **PUBLISHED[kind][name]))
    # the writer needs the diffusers configs (block layout) of unet and vae only
    return {name: (model.state_dict(), dict(model.config) if name in ("unet", "vae") else {})
            for name, model in components.items()}


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_real_size_architectures_get_their_published_configs(kind):
    components = _meta_components(kind)
    shapes = {k: tuple(v.shape) for k, v in to_original(kind, components).items()}
    plan = plan_from_shapes(shapes)
    assert plan.model_type == MODEL_TYPES[kind] and plan.clip_skip == (1 if kind == "sd2" else 0)
    for name, published in {**PUBLISHED[kind], "vae": SD_VAE}.items():
        for key, value in published.items():
            assert plan.configs[name][key] == value, f"{kind} {name} `{key}`"
        reference = components[name][0]
        if "text" in name:
            reference = transformers_layout(reference)
        mapped = {dst: take_shape(shapes[plan.prefixes[name] + t.key], t.op) for dst, t in plan.plans[name].items()}
        assert mapped == {k: tuple(v.shape) for k, v in reference.items() if not k.endswith("position_ids")}


def test_sd2_file_keeps_every_text_layer_and_reports_clip_skip(single_files, tiny_checkpoint, tmp_path, cache_dir):
    """diffusers' SD 2.x folders hold one text layer less than the file; the file's layers all stay."""
    folder = tmp_path / "sd2_23_of_24"
    shutil.copytree(tiny_checkpoint("sd2"), folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] - 1}))
    source = resolve_source(single_files["sd2"], config_folder=folder, cache_dir=cache_dir)
    assert source.clip_skip == 1
    written = json.loads((source.path / "text_encoder" / "config.json").read_text())
    assert written["num_hidden_layers"] == config["num_hidden_layers"]
    last = config["num_hidden_layers"] - 1
    weights = load_file(source.weight_files["text_encoder/model.safetensors"])
    assert f"text_model.encoder.layers.{last}.mlp.fc1.weight" in weights


def test_materialized_folder_is_reused_and_written_atomically(single_files, tiny_checkpoint, tmp_path):
    first = resolve_source(single_files["sd15"], config_folder=tiny_checkpoint("sd15"), cache_dir=tmp_path)
    stamp = first.weight_files["unet/diffusion_pytorch_model.safetensors"].stat().st_mtime_ns
    second = resolve_source(single_files["sd15"], config_folder=tiny_checkpoint("sd15"), cache_dir=tmp_path)
    assert second.path == first.path
    assert second.weight_files["unet/diffusion_pytorch_model.safetensors"].stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "single_file").iterdir()] == [first.path.name]  # no temporary left
    other = resolve_source(single_files["sd15"], config_folder=tiny_checkpoint("sd15"), cache_dir=tmp_path,
                           prediction_type="v_prediction")
    assert other.path != first.path
    assert json.loads((other.path / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    digest = hashlib.sha256(first.weight_files["vae/diffusion_pytorch_model.safetensors"].read_bytes()).hexdigest()
    assert first.weights_sha256()["vae/diffusion_pytorch_model.safetensors"] == digest


def test_config_folder_that_disagrees_with_the_weights_is_rejected(single_files, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"unet/config.json: `cross_attention_dim` is 32 .* need 64"):
        resolve_source(single_files["sdxl"], config_folder=tiny_checkpoint("sd15"), cache_dir=tmp_path)


def _not_stable_diffusion(folder: Path, tiny_sd15: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, str(folder / "other.safetensors"))
    return folder / "other.safetensors"


def _garbage(folder: Path, tiny_sd15: Path) -> Path:
    (folder / "bad.safetensors").write_bytes(b"\x10\x00garbage")
    return folder / "bad.safetensors"


def _pickle(folder: Path, tiny_sd15: Path) -> Path:
    (folder / "model.ckpt").write_bytes(b"not read")
    return folder / "model.ckpt"


def _missing(folder: Path, tiny_sd15: Path) -> Path:
    return folder / "missing.safetensors"


def _tiny_sd15(folder: Path, tiny_sd15: Path) -> Path:
    return tiny_sd15


@pytest.mark.parametrize("make, kwargs, error, message", [
    (_not_stable_diffusion, {}, ExportError, r"no `model.diffusion_model.\*` UNet keys"),
    (_garbage, {}, ExportError, r"cannot read .*bad.safetensors as safetensors"),
    (_pickle, {}, InputError, r"`source` must be a .safetensors file \(pickled"),
    (_missing, {}, ExportError, r"single-file checkpoint not found: .*missing.safetensors"),
    (_tiny_sd15, {"prediction_type": "eps"}, InputError, r"`prediction_type` must be one of"),
    (_tiny_sd15, {"config_overrides": {"safety_checker": {}}}, InputError, r"`config_overrides` must be"),
    (_tiny_sd15, {"variant": "fp16"}, InputError, r"`variant` must be None for a single-file"),
    (_tiny_sd15, {}, ConfigError, r"cannot infer text_encoder `num_attention_heads`.*config_overrides"),
])
def test_single_file_errors_name_the_problem(make, kwargs, error, message, single_files, tmp_path):
    with pytest.raises(error, match=message):
        resolve_source(make(tmp_path, single_files["sd15"]), cache_dir=tmp_path / "cache", **kwargs)


# --- local folders ------------------------------------------------------------------------------------------------

def test_folder_source_lists_components_weights_and_hashes(tiny_checkpoint):
    folder = tiny_checkpoint("sdxl")
    source = resolve_source(folder)
    assert (source.kind, source.path, source.revision, source.variant) == ("folder", folder.resolve(), None, None)
    assert source.pipeline_class == "StableDiffusionXLPipeline"
    assert source.components["text_encoder_2"] == ("transformers", "CLIPTextModelWithProjection")
    assert sorted(source.weight_files) == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                                           "unet/diffusion_pytorch_model.safetensors",
                                           "vae/diffusion_pytorch_model.safetensors"]
    hashes = source.weights_sha256()
    for relative, path in source.weight_files.items():
        assert hashes[relative] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_variant_picks_its_own_weight_files(variant_folder):
    default, fp16 = resolve_source(variant_folder), resolve_source(variant_folder, variant="fp16")
    assert sorted(default.weight_files) == ["text_encoder/model.safetensors",
                                            "unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors"]
    assert sorted(fp16.weight_files) == ["text_encoder/model.fp16.safetensors",
                                         "unet/diffusion_pytorch_model.fp16.safetensors",
                                         "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert fp16.variant == "fp16"
    assert {t.dtype for path in fp16.weight_files.values() for t in load_file(path).values()} == {torch.float16}
    with pytest.raises(ExportError, match=r"no `bf16` weights in .*: expected \*\.bf16\.safetensors"):
        resolve_source(variant_folder, variant="bf16")


def _break(folder: Path, how: str) -> None:
    if how == "no_index":
        (folder / "model_index.json").unlink()
    elif how == "corrupt_index":
        (folder / "model_index.json").write_text("{not json")
    elif how == "no_unet":
        shutil.rmtree(folder / "unet")
    elif how == "corrupt_config":
        (folder / "vae" / "config.json").write_text("[1, 2")
    elif how == "pickle_only":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.rename(weights.with_suffix(".bin"))
    elif how == "no_tokenizer_files":
        for path in (folder / "tokenizer").iterdir():
            path.unlink()


@pytest.mark.parametrize("how, error, message", [
    ("no_index", ExportError, r"model_index.json not found"),
    ("corrupt_index", ConfigError, r"model_index.json is not valid JSON"),
    ("no_unet", ExportError, r"component folder missing: .*unet"),
    ("corrupt_config", ConfigError, r"vae/config.json is not valid JSON"),
    ("pickle_only", ExportError, r"only pickle-format weights \['diffusion_pytorch_model.bin'\]"),
    ("no_tokenizer_files", ExportError, r"tokenizer files missing in .*tokenizer"),
])
def test_broken_folders_raise_one_line_errors_naming_the_file(how, error, message, tiny_checkpoint, tmp_path):
    folder = tmp_path / "sd15"
    shutil.copytree(tiny_checkpoint("sd15"), folder)
    _break(folder, how)
    with pytest.raises(error, match=message) as raised:
        resolve_source(folder)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("source, kwargs, error, message", [
    ("no/such/place", {}, ExportError, "neither a local folder, a .safetensors file nor a Hub repo id"),
    ("FOLDER", {"config_folder": "x"}, InputError, "`config_folder` must be None unless"),
    ("FOLDER", {"revision": "main"}, InputError, "`revision` must be None for a local folder"),
    ("FOLDER", {"variant": "fp 16"}, InputError, "`variant` must be None or a weight variant name"),
])
def test_invalid_arguments_are_rejected_before_any_work(source, kwargs, error, message, tiny_checkpoint):
    with pytest.raises(error, match=message):
        resolve_source(tiny_checkpoint("sd15") if source == "FOLDER" else source, **kwargs)


# --- Hugging Face Hub ---------------------------------------------------------------------------------------------

def test_hub_patterns_fetch_configs_tokenizers_and_one_variant():
    from huggingface_hub.utils import filter_repo_objects

    listing = ["model_index.json", "README.md", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
               "unet/model.onnx", "text_encoder/config.json", "text_encoder/model.safetensors",
               "text_encoder/model.fp16.safetensors", "text_encoder/flax_model.msgpack", "tokenizer/vocab.json",
               "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json",
               "safety_checker/model.safetensors", "safety_checker/config.json"]
    components = {"unet": ("diffusers", "UNet2DConditionModel"), "text_encoder": ("transformers", "CLIPTextModel"),
                  "tokenizer": ("transformers", "CLIPTokenizer"), "scheduler": ("diffusers", "PNDMScheduler")}
    configs = {"model_index.json", "unet/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
               "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"}
    allow, ignore = hub_patterns(components, None)
    assert set(filter_repo_objects(listing, allow_patterns=allow, ignore_patterns=ignore)) == configs | {
        "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    allow, ignore = hub_patterns(components, "fp16")
    assert set(filter_repo_objects(listing, allow_patterns=allow, ignore_patterns=ignore)) == configs | {
        "unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"}


def _cache_repo(hub: Path, repo_id: str, files_from: Path, names: list[str] | None = None) -> str:
    """Lay `files_from` out as a cached Hub snapshot (models--owner--name/snapshots/<hash>, refs/main)."""
    storage = hub / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for name in names or [p.name for p in files_from.iterdir()]:
        (shutil.copytree if (files_from / name).is_dir() else shutil.copy)(files_from / name, snapshot / name)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return commit


OFFLINE_SCRIPT = """
import json, sys
from diffrt.export.checkpoint import resolve_source
args = json.loads(sys.argv[1])
out = {}
for name, call in args.items():
    try:
        source = resolve_source(*call["args"], **call["kwargs"])
        out[name] = {"kind": source.kind, "path": str(source.path), "revision": source.revision,
                     "weights": sorted(source.weight_files), "components": sorted(source.components)}
    except Exception as error:
        out[name] = {"error": type(error).__name__, "message": str(error)}
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh interpreter imports torch and huggingface_hub
def test_hub_ids_resolve_from_the_cache_when_offline(variant_folder, tiny_checkpoint, single_files, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE are read by huggingface_hub at import: run in a fresh interpreter."""
    hub = tmp_path / "hf_home" / "hub"
    commit = _cache_repo(hub, "tiny/sd15", variant_folder)
    _cache_repo(hub, "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_checkpoint("sd15"), ["tokenizer"])
    cache = str(tmp_path / "diffrt_cache")
    calls = {
        "default": {"args": ["tiny/sd15"], "kwargs": {}},
        "fp16": {"args": ["tiny/sd15"], "kwargs": {"variant": "fp16"}},
        "uncached": {"args": ["nobody/missing"], "kwargs": {}},
        "single_file_tokenizers_from_hub_cache": {
            "args": [str(single_files["sd15"])], "kwargs": {"config_overrides": tiny_overrides("sd15"),
                                                            "cache_dir": cache}},
        "single_file_tokenizers_not_cached": {
            "args": [str(single_files["sdxl_refiner"])],
            "kwargs": {"config_overrides": tiny_overrides("sdxl_refiner"), "cache_dir": cache}},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(calls)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    results = json.loads(run.stdout.strip().splitlines()[-1])
    snapshot = str(hub / "models--tiny--sd15" / "snapshots" / commit)
    assert results["default"] == {"kind": "hub", "path": snapshot, "revision": commit,
                                  "components": ["scheduler", "text_encoder", "tokenizer", "unet", "vae"],
                                  "weights": ["text_encoder/model.safetensors",
                                              "unet/diffusion_pytorch_model.safetensors",
                                              "vae/diffusion_pytorch_model.safetensors"]}
    assert results["fp16"]["weights"] == ["text_encoder/model.fp16.safetensors",
                                          "unet/diffusion_pytorch_model.fp16.safetensors",
                                          "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert results["uncached"]["error"] == "ExportError"
    assert "'nobody/missing'" in results["uncached"]["message"] and "HF_HUB_OFFLINE" in results["uncached"]["message"]
    converted = Path(results["single_file_tokenizers_from_hub_cache"]["path"])
    assert (converted / "tokenizer" / "tokenizer.json").read_bytes() == (
        tiny_checkpoint("sd15") / "tokenizer" / "tokenizer.json").read_bytes()
    missing = results["single_file_tokenizers_not_cached"]
    assert missing["error"] == "ExportError" and "stable-diffusion-xl-refiner-1.0" in missing["message"]
    assert "config_folder" in missing["message"]
