"""Single-file SD3 / SD3.5 / FLUX.1 checkpoints: key mapping, configs, components from `config_folder`, export.

Oracles: diffusers' own `from_single_file` (the file layout the test writer produces is the one diffusers reads,
so it is the real one), the tiny diffusers folders themselves (a converted file must give back exactly their
tensors), diffusers' converters and published configs at real size on the meta device, and the package exported
from the diffusers folder (the package from the file must hold the same ONNX weights).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402
from single_file_flow_writer import flux_to_original, sd3_to_original, write_flow_single_file  # noqa: E402

from diffrt.errors import ConfigError, ExportError, InputError  # noqa: E402
from diffrt.export.checkpoint import resolve_source  # noqa: E402
from diffrt.export.single_file import plan_single_file  # noqa: E402
from diffrt.export.single_file_flux import flux_hidden, flux_transformer_plan, infer_flux_transformer  # noqa: E402
from diffrt.export.single_file_sd3 import infer_sd3_transformer, sd3_transformer_plan  # noqa: E402
from diffrt.export.single_file_unet import Take, apply_take, take_shape  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "model_configs"
FAMILY = {"sd3": "sd3", "sd35": "sd3", "flux_dev": "flux", "flux_schnell": "flux"}
MODEL_TYPES = {"sd3": "sd3", "sd35": "sd35_medium", "flux_dev": "flux-dev", "flux_schnell": "flux-schnell"}
# How each kind ships: SD3 with every text encoder, SD3.5 with the VAE only, FLUX.1 as BFL's bare transformer.
LAYOUTS = {
    "sd3": dict(texts=("clip_l", "clip_g", "t5xxl")),
    "sd35": dict(),
    "flux_dev": dict(prefix="", vae=False),
    "flux_schnell": dict(prefix="", vae=False),
}
WEIGHTS = {"transformer": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
# Published transformer configs (stabilityai/stable-diffusion-3-medium-diffusers, -3.5-medium, -3.5-large).
SD3_MEDIUM = {
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}
SD35_MEDIUM = {**SD3_MEDIUM, "dual_attention_layers": list(range(13)), "pos_embed_max_size": 384, "qk_norm": "rms_norm"}
SD35_LARGE = {**SD3_MEDIUM, "caption_projection_dim": 2432, "num_attention_heads": 38, "num_layers": 38,
              "qk_norm": "rms_norm"}


@pytest.fixture(scope="module")
def flow_files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("flow_single_files")
    return {kind: write_flow_single_file(tiny_checkpoint(kind), FAMILY[kind], out / f"{kind}.safetensors", **layout)
            for kind, layout in LAYOUTS.items()}


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def component_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(next((folder / name).glob("*.safetensors")))


def assert_same_tensors(ours: dict, reference: dict, what: str) -> None:
    assert sorted(ours) == sorted(reference), f"{what}: key sets differ: {sorted(set(ours) ^ set(reference))[:5]}"
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), f"{what}: {key} differs"


# --- the Take operations ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("take,expected", [
    (Take("w", "rows", (2, 5)), lambda t: t[2:5]),
    (Take("w", "swap"), lambda t: torch.cat([t[3:], t[:3]])),
    (Take("w", "q"), lambda t: t[:2]),
    (Take("w", "v"), lambda t: t[4:]),
    (Take("w", "eye"), lambda t: torch.eye(4)),
])
def test_take_operations_give_the_shape_take_shape_promises(take, expected):
    tensor = torch.arange(24.0).reshape(6, 4)
    result = apply_take(tensor, take)
    assert tuple(result.shape) == take_shape(tuple(tensor.shape), take.op, take.rows)
    assert torch.equal(result, expected(tensor))
    assert result.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr() or take.op == "copy"


# --- diffusers reads the files the test writer makes: the layout is the real one ----------------------------------

def _from_single_file(kind: str, file: Path, folder: Path, monkeypatch):
    import diffusers

    if FAMILY[kind] == "sd3":
        cls = diffusers.SD3Transformer2DModel
    else:
        cls = diffusers.FluxTransformer2DModel
        # diffusers' FLUX converter splits `linear1` at FLUX.1's hard-coded width (3072, 3072, 3072, 12288); at the
        # tiny width that is the same split in proportion (q, k, v, then the 4x MLP input). Nothing else changes.
        split = torch.split

        def tiny_split(tensor, sizes, dim=0):
            if isinstance(sizes, (tuple, list)) and tuple(sizes) == (3072, 3072, 3072, 12288):
                hidden = tensor.shape[dim] // 7
                sizes = (hidden, hidden, hidden, 4 * hidden)
            return split(tensor, sizes, dim)

        monkeypatch.setattr(torch, "split", tiny_split)
    model = cls.from_single_file(str(file), config=str(folder), subfolder="transformer", local_files_only=True)
    monkeypatch.undo()
    return model


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_diffusers_from_single_file_reads_the_written_file_back_exactly(kind, flow_files, tiny_checkpoint,
                                                                       monkeypatch):
    folder = tiny_checkpoint(kind)
    model = _from_single_file(kind, flow_files[kind], folder, monkeypatch)
    assert_same_tensors(model.state_dict(), component_weights(folder, "transformer"), f"diffusers {kind}")


# --- the converted folder -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_materialized_transformer_equals_the_original_exactly(kind, flow_files, tiny_checkpoint, cache_dir):
    folder = tiny_checkpoint(kind)
    source = resolve_source(flow_files[kind], config_folder=folder, cache_dir=cache_dir)
    assert (source.kind, source.model_type) == ("single_file", MODEL_TYPES[kind])
    assert source.pipeline_class == ("StableDiffusion3Pipeline" if FAMILY[kind] == "sd3" else "FluxPipeline")
    assert_same_tensors(component_weights(source.path, "transformer"), component_weights(folder, "transformer"), kind)
    config = json.loads((source.path / "transformer" / "config.json").read_text())
    reference = json.loads((folder / "transformer" / "config.json").read_text())
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in reference.items() if not k.startswith("_")}
    # every other component the pipeline needs, from the file or (here: text encoders of SD3.5, all of FLUX) the
    # config folder, with the same tensors as the diffusers folder
    index = json.loads((source.path / "model_index.json").read_text())
    reference_index = json.loads((folder / "model_index.json").read_text())
    for name, entry in reference_index.items():
        if isinstance(entry, list) and entry[0] is not None:
            assert index[name] == entry, name
            if name.startswith(("vae", "text_encoder")):
                assert_same_tensors(component_weights(source.path, name), component_weights(folder, name), name)
    scheduler = json.loads((source.path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"]


def test_sd3_configs_come_from_the_shapes_where_the_weights_tell(flow_files, tiny_checkpoint):
    """Without a config folder's transformer, SD3.5's qk-norm gives the head width; the VAE, CLIP and T5 configs
    are inferred (tiny CLIP widths hide only the head count, given here as an override)."""
    folder = tiny_checkpoint("sd3")
    partial = flow_files["sd3"].parent / "sd3_configless"
    shutil.copytree(folder, partial)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"):
        for config in (partial / name).glob("*config.json"):
            config.unlink()
    heads = {"text_encoder": {"num_attention_heads": 4}, "text_encoder_2": {"num_attention_heads": 4},
             "transformer": {"attention_head_dim": 8, "num_attention_heads": 4, "sample_size": 8}}
    plan = plan_single_file(flow_files["sd3"], config_folder=partial, config_overrides=heads)
    reference = {name: json.loads((folder / name / "config.json").read_text()) for name in
                 ("transformer", "vae", "text_encoder_3")}
    # not the weights' business: the tiny VAE's groups / factors (not SD3's), what transformers 5 saves for a T5
    # encoder (the published T5 v1.1 config, which we write, says is_encoder_decoder / tie_word_embeddings / use_cache)
    skip = {"norm_num_groups", "sample_size", "scaling_factor", "force_upcast", "is_encoder_decoder",
            "tie_word_embeddings", "use_cache", "dtype"}
    for name, config in reference.items():
        ours = plan.configs[name]
        for key, value in config.items():
            if not key.startswith("_") and key not in skip and key in ours:
                assert ours[key] == (list(value) if isinstance(value, tuple) else value), (name, key)
    assert plan.configs["vae"]["shift_factor"] == 0.0609 and plan.configs["vae"]["scaling_factor"] == 1.5305
    assert plan.configs["scheduler"] == {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                         "num_train_timesteps": 1000, "shift": 3.0}
    with pytest.raises(ConfigError, match="cannot infer transformer `attention_head_dim`"):
        plan_single_file(flow_files["sd3"], config_folder=partial,
                         config_overrides={k: v for k, v in heads.items() if k != "transformer"})


@pytest.mark.parametrize("published,family", [
    (SD3_MEDIUM, "sd3"), (SD35_MEDIUM, "sd3"), (SD35_LARGE, "sd3"),
    (json.loads((CONFIGS / "black-forest-labs--FLUX.1-dev--transformer.json").read_text()), "flux"),
    (json.loads((CONFIGS / "black-forest-labs--FLUX.1-schnell--transformer.json").read_text()), "flux"),
], ids=["sd3-medium", "sd3.5-medium", "sd3.5-large", "flux-dev", "flux-schnell"])
def test_real_size_layouts_map_like_diffusers(published, family):
    """The published architectures on the meta device: our plan gives every diffusers tensor at its shape, the
    config inferred from the shapes is the published one, and diffusers' converter agrees key for key."""
    import diffusers
    from diffusers.loaders import single_file_utils as sfu

    cls = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in published.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    original = (sd3_to_original if family == "sd3" else flux_to_original)(model.state_dict(), dict(model.config))
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    if family == "sd3":
        plan, unknown = sd3_transformer_plan(list(shapes))
        structure, conventions = infer_sd3_transformer(shapes)
        converted = sfu.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    else:
        plan, unknown = flux_transformer_plan(list(shapes), flux_hidden(shapes))
        structure, conventions = infer_flux_transformer(shapes)
        converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert unknown == []
    assert {k: take_shape(shapes[t.key], t.op, t.rows) for k, t in plan.items()} == expected
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    inferred = {**conventions, **structure}
    for key, value in published.items():
        if not key.startswith("_"):
            assert inferred.get(key, model.config[key]) == value, key
    assert all(v is not None for k, v in inferred.items() if k != "out_channels" and k != "qk_norm")


def test_clip_l_without_projection_is_the_identity(flow_files, tiny_checkpoint, tmp_path, cache_dir):
    """Stability's SD3 files carry no CLIP-L `text_projection`: SD3 uses its pooled output unprojected."""
    folder = tiny_checkpoint("sd3")
    file = write_flow_single_file(folder, "sd3", tmp_path / "sd3_no_projection.safetensors",
                                  texts=("clip_l", "clip_g", "t5xxl"),
                                  drop=("text_encoders.clip_l.transformer.text_projection.weight",))
    source = resolve_source(file, config_folder=folder, cache_dir=cache_dir)
    weights = component_weights(source.path, "text_encoder")
    assert torch.equal(weights["text_projection.weight"], torch.eye(32))
    reference = component_weights(folder, "text_encoder")
    reference = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                 for k, v in reference.items()}
    assert_same_tensors({k: v for k, v in weights.items() if k != "text_projection.weight"},
                        {k: v for k, v in reference.items() if k != "text_projection.weight"}, "CLIP-L")


def test_flux_comfyui_all_in_one_file_needs_nothing_borrowed(tiny_checkpoint, tmp_path, cache_dir):
    """`model.diffusion_model.` transformer with the VAE and `text_encoders.{clip_l,t5xxl}`, in bfloat16: everything
    comes from the file (the config folder gives configs and tokenizers only) and keeps the file's dtype."""
    folder = tiny_checkpoint("flux_dev")
    file = write_flow_single_file(folder, "flux", tmp_path / "flux_aio.safetensors", texts=("clip_l", "t5xxl"),
                                  dtype=torch.bfloat16)
    plan = plan_single_file(file, config_folder=folder)
    assert plan.borrowed == {} and set(plan.plans) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    source = resolve_source(file, config_folder=folder, cache_dir=cache_dir)
    for name in ("transformer", "vae"):
        reference = {k: v.to(torch.bfloat16) for k, v in component_weights(folder, name).items()}
        assert_same_tensors(component_weights(source.path, name), reference, name)


def test_schnell_file_with_a_dev_folder_follows_the_file(flow_files, tiny_checkpoint, cache_dir):
    """The FLUX.1-dev folder serves a schnell file: VAE / CLIP / T5 are the same models; the guidance embedding and
    the schedule follow the file."""
    source = resolve_source(flow_files["flux_schnell"], config_folder=tiny_checkpoint("flux_dev"), cache_dir=cache_dir)
    schnell = tiny_checkpoint("flux_schnell")
    assert source.model_type == "flux-schnell"
    assert json.loads((source.path / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    scheduler = json.loads((source.path / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (1.0, False)
    assert_same_tensors(component_weights(source.path, "transformer"), component_weights(schnell, "transformer"),
                        "schnell transformer")


def test_sd3_file_without_t5_runs_without_text_encoder_3(tiny_checkpoint, tmp_path, cache_dir, caplog):
    """`sd3_medium_incl_clips.safetensors` has no T5; a config folder without one either: the package leaves it out
    (the runtime then runs as Diffusers with `text_encoder_3=None`), with a warning."""
    folder = tiny_checkpoint("sd3")
    no_t5 = tmp_path / "sd3_no_t5"
    shutil.copytree(folder, no_t5, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((no_t5 / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (no_t5 / "model_index.json").write_text(json.dumps(index))
    file = write_flow_single_file(folder, "sd3", tmp_path / "sd3_incl_clips.safetensors", texts=("clip_l", "clip_g"))
    with caplog.at_level(logging.WARNING):
        source = resolve_source(file, config_folder=no_t5, cache_dir=cache_dir)
    assert "text_encoder_3" not in source.components and "tokenizer_3" not in source.components
    assert {"text_encoder", "text_encoder_2", "transformer", "vae"} <= set(source.components)
    assert "has no text_encoder_3" in caplog.text


# --- what is missing is named, before anything is written ---------------------------------------------------------

def test_flux_file_without_config_folder_names_what_is_missing(flow_files, tmp_path):
    from diffrt.export import export_pipeline

    with pytest.raises(InputError) as error:
        export_pipeline(flow_files["flux_dev"], tmp_path / "package")
    message = str(error.value)
    assert "FLUX.1 single file without vae, text_encoder, text_encoder_2" in message
    assert "--config-folder" in message and "black-forest-labs/FLUX.1-dev" in message
    assert not (tmp_path / "package").exists()


def test_sd35_file_without_text_encoders_names_them(flow_files, tmp_path):
    with pytest.raises(ExportError, match=r"SD3 / SD3\.5 single file without text_encoder, text_encoder_2: pass "
                                          r"config_folder"):
        resolve_source(flow_files["sd35"], cache_dir=tmp_path)


def test_config_folder_lacking_a_component_is_named(flow_files, tiny_checkpoint, tmp_path):
    partial = tmp_path / "flux_without_t5"
    shutil.copytree(tiny_checkpoint("flux_dev"), partial)
    for weights in (partial / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ExportError, match=rf"without text_encoder_2: {partial} has no text_encoder_2 with "
                                          r"\.safetensors weights either"):
        resolve_source(flow_files["flux_dev"], config_folder=partial, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "single_file").exists() or not any((tmp_path / "cache" / "single_file").iterdir())


def test_config_folder_of_another_family_is_refused(flow_files, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="is a StableDiffusion3Pipeline checkpoint, but the single file holds a "
                                          "FLUX.1 transformer"):
        resolve_source(flow_files["flux_dev"], config_folder=tiny_checkpoint("sd3"), cache_dir=tmp_path)


def test_flow_files_refuse_ldm_only_options(flow_files, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="`prediction_type` applies to SD 1.x / 2.x / XL single files"):
        resolve_source(flow_files["sd3"], config_folder=tiny_checkpoint("sd3"), prediction_type="epsilon",
                       cache_dir=tmp_path)


def test_unknown_transformer_keys_are_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    file = write_flow_single_file(tiny_checkpoint("flux_dev"), "flux", tmp_path / "f.safetensors", prefix="",
                                  vae=False)
    state = load_file(file)
    state["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(2, 2)
    save_file(state, str(file))
    with pytest.raises(ExportError, match="unrecognised transformer key.*lora_up.*not a supported FLUX.1 layout"):
        plan_single_file(file, config_folder=tiny_checkpoint("flux_dev"))


# --- export: the package from the file is the package from the folder ---------------------------------------------

def _initializers(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("kind", ["sd3", "flux_dev"])
def test_export_from_the_single_file_equals_the_folder_package(kind, flow_files, tiny_checkpoint, tiny_package,
                                                               tmp_path, monkeypatch):
    import numpy as np

    from diffrt.export import export_pipeline

    monkeypatch.setenv("DIFFRT_CACHE", str(tmp_path / "cache"))
    reference = tiny_package(kind)
    package = export_pipeline(flow_files[kind], tmp_path / "package", config_folder=tiny_checkpoint(kind),
                              validate=False)
    manifest = json.loads((package / "diffrt.json").read_text())
    assert manifest["source"]["kind"] == "single_file" and manifest["pipeline"] == json.loads(
        (reference / "diffrt.json").read_text())["pipeline"]
    names = sorted(p.name for p in reference.iterdir() if p.is_dir())
    assert sorted(p.name for p in package.iterdir() if p.is_dir()) == names
    for name in names:
        for path in sorted((reference / name).iterdir()):
            ours = package / name / path.name
            if path.suffix == ".onnx":
                expected, actual = _initializers(path), _initializers(ours)
                assert sorted(actual) == sorted(expected), name
                assert all(np.array_equal(actual[k], expected[k]) for k in expected), name
            elif path.suffix == ".json":
                strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
                assert strip(json.loads(ours.read_text())) == strip(json.loads(path.read_text())), path
            else:
                assert ours.read_bytes() == path.read_bytes(), path


def test_cli_export_takes_config_folder(flow_files, tiny_checkpoint, tmp_path):
    from cli_runner import one_line_error, run_cli

    missing = run_cli("export", flow_files["flux_schnell"], tmp_path / "a", DIFFRT_CACHE=str(tmp_path / "cache"))
    assert missing.returncode != 0
    one_line_error(missing.stderr, "export", "without vae, text_encoder, text_encoder_2", "--config-folder")
    done = run_cli("export", flow_files["flux_schnell"], tmp_path / "b", "--config-folder",
                   tiny_checkpoint("flux_schnell"), "--components", "transformer", "--no-validate",
                   DIFFRT_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "transformer" / "model.onnx").is_file()
