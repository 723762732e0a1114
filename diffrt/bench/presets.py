"""Benchmark presets: random-weight diffusers checkpoints built from the published configs, exported once, cached.

No preset needs a download: each `configs/<preset>.json` holds the published denoiser (UNet or MMDiT transformer)
and VAE configs, the published text-encoder configs (CLIP, T5) and the scheduler config of that architecture
(`tiny`, `tiny-sd3` and `tiny-flux` are small stand-ins for tests). A config may derive from another (`"base"`,
with the keys it overrides merged one level deep), and may leave components unbuilt (`"not_built"`: name ->
why; SD 3.5 runs without its T5 encoder), store the checkpoint in a smaller dtype (`"storage_dtype"`), skip the
export's validation (`"export_validate": false`) and the engines' optimised-model cache (`"engine_cache": false`),
so that a real-size model needs one float32 copy on disk, not three. Random weights
have the real shapes, so the measured compute is the real model's. The checkpoint and the exported package live
under `$DIFFRT_CACHE/presets/<preset>-<spec hash>/` (default `~/.cache/diffrt`), so a changed spec never reuses a
stale build. Building needs torch/diffusers (the `export` extra) and runs in its own process (`python -m
diffrt.bench.preset_build PRESET`), so the diffrt side of a benchmark stays torch-free. Before building, that process
sizes every component from its config (on the meta device: no memory) and refuses, with the numbers, a preset
whose build, export or benchmark (diffrt's and Diffusers' float32 copies side by side) cannot fit this machine's
memory or disk (`diffrt.bench.preset_fit`): FLUX.1's 12B-parameter transformer is refused on a 24 GiB machine
before anything is written.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from diffrt.errors import InputError, invalid
from diffrt.package.files import AtomicFolder, cache_root, write_text
from diffrt.package.names import CONFIG_NAME, INDEX_NAME, MANIFEST_NAME

__all__ = ["PRESETS", "Preset", "load_preset", "cache_root", "ensure_package", "ensure_tiny_vae", "build_checkpoint",
           "ensure_controlnet_package"]

logger = logging.getLogger(__name__)

#: bumped when the exporter writes different graphs for the same spec, so that a package cached by an older diffrt
#: is rebuilt rather than measured (2: UNet / VAE / ControlNet attention as ONNX Runtime's MultiHeadAttention)
BUILD_REVISION = "2"

PRESETS = ("tiny", "sd15", "sd21", "sdxl", "tiny-sd3", "tiny-flux", "sd35m", "sd35m-6blocks", "flux-schnell")
SEED = 0
# The benchmark is text-to-image: the VAE encoder would only add export time (minutes for real sizes).
BENCH_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder")
#: the build child (`diffrt.bench.preset_build`: torch, diffusers), run with a preset name and its options
BUILD_COMMAND = (sys.executable, "-m", "diffrt.bench.preset_build")
#: exit status of `python -m diffrt.bench.preset_build` when the preset cannot fit this machine (its last stdout line
#: says why)
REFUSED = 3


@dataclass(frozen=True)
class Preset:
    name: str
    spec: dict[str, Any]

    @property
    def key(self) -> str:
        """The preset name and a hash of its spec: what a cached build depends on."""
        digest = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:10]}"

    @property
    def folder(self) -> Path:
        return cache_root() / "presets" / self.key

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def package(self, precision: str = "fp32", target: str = "onnxruntime", deep_cache: bool = False) -> Path:
        """The exported package; `deep_cache`: exported with DeepCache (branch 0) for `--deep-cache`."""
        return self.folder / (f"package-{precision}-{target}" + ("-deepcache" if deep_cache else ""))

    @property
    def tiny_vae(self) -> Path:
        """The random-weight TAESD checkpoint (diffusers `AutoencoderTiny` folder) for `--vae tiny`."""
        return self.folder / "tiny_vae"

    def controlnet_package(self, count: int, precision: str = "fp32", target: str = "onnxruntime") -> Path:
        """The package with `count` random-weight ControlNets (`--controlnet N`); the plain package stays plain."""
        return self.folder / f"package-{precision}-{target}-controlnet{count}"

    def controlnet(self, index: int) -> Path:
        """The random-weight diffusers ControlNetModel folder number `index` (its seed is SEED + 1 + index)."""
        return self.folder / f"controlnet_{index}"

    @property
    def default_size(self) -> int:
        return int(self.spec["default_size"])

    @property
    def denoiser(self) -> str:
        """`unet` or `transformer` (SD3 / FLUX)."""
        return "transformer" if "transformer" in self.spec else "unet"

    @property
    def built(self) -> list[str]:
        """The model folders this preset's checkpoint holds (the spec's, less `not_built`)."""
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")
        return [name for name in names if name in self.spec and name not in self.spec.get("not_built", {})]

    @property
    def exported(self) -> list[str]:
        """The package's components: the built text encoders and denoiser, and the VAE decoder."""
        return [name for name in BENCH_COMPONENTS if name in self.built] + ["vae_decoder"]


def _revision_file(package: Path) -> Path:
    # beside the package, not in it: a package folder holds only what its manifest lists
    return package.with_name(package.name + ".revision")


def is_current(package: Path) -> bool:
    """Whether `package` is a finished build of this diffrt's exporter (`BUILD_REVISION`)."""
    stamp = _revision_file(package)
    return (package / MANIFEST_NAME).exists() and stamp.is_file() and stamp.read_text().strip() == BUILD_REVISION


def _stamp(package: Path) -> None:
    write_text(_revision_file(package), BUILD_REVISION + "\n")


def load_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise invalid("preset", f"a package folder or one of {', '.join(PRESETS)}", name)
    return Preset(name, _spec(name))


def _spec(name: str) -> dict[str, Any]:
    """The preset's config; one with `"base"` is that preset's, with its own keys merged one level deep."""
    spec = json.loads(resources.files("diffrt.bench").joinpath("configs").joinpath(f"{name}.json").read_text())
    base = spec.pop("base", None)
    if base is None:
        return spec
    merged = _spec(base)
    for key, value in spec.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    return merged


def is_preset(name: str) -> bool:
    return name in PRESETS and not Path(name).exists()


def ensure_package(name: str, precision: str = "fp32", target: str = "onnxruntime", beside: bool = False,
                   deep_cache: bool = False) -> Path:
    """The cached package of preset `name`, built (in a child process with torch) on first use. `beside`: the
    benchmark will hold diffrt's and Diffusers' weights at once; refused (InputError) where they cannot fit.
    `deep_cache`: the package exported with DeepCache's shallow UNet (a folder of its own)."""
    preset = load_preset(name)
    package = preset.package(precision, target, deep_cache)
    if is_current(package) and not beside:
        return package
    if not is_current(package):
        logger.info("preset %s: first use, building random-weight checkpoint and exporting it to %s "
                    "(minutes for real-size models; cached afterwards)", name, package)
    command = [*BUILD_COMMAND, name, "--precision", precision, "--target", target,
               *(["--beside"] if beside else []), *(["--deep-cache"] if deep_cache else [])]
    _build_child(command, name)
    if not is_current(package):
        raise InputError(f"building preset {name!r} failed (see the log above); it needs the `export` extra "
                         "(torch, diffusers, transformers)")
    return package


def _build_child(command: list[str], name: str) -> None:
    """Run a build child; InputError with its reason when it refused the preset (REFUSED), or when it failed."""
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode == REFUSED and lines:
        raise InputError(lines[-1])
    if result.returncode != 0:
        raise InputError(f"building preset {name!r} failed (see the log above); it needs the `export` extra "
                         "(torch, diffusers, transformers)")


def ensure_controlnet_package(name: str, count: int, precision: str = "fp32", target: str = "onnxruntime",
                              beside: bool = False) -> Path:
    """The cached package of preset `name` with `count` ControlNets, built (in a child process) on first use;
    `beside` as in `ensure_package` (checked with the plain preset's sizes: a lower bound)."""
    preset = load_preset(name)
    package = preset.controlnet_package(count, precision, target)
    if is_current(package) and not beside:
        return package
    logger.info("preset %s: first use with %d ControlNet(s): building random-weight ControlNets and exporting them "
                "with the UNet to %s (minutes for real-size models; cached afterwards)", name, count, package)
    command = [*BUILD_COMMAND, name, "--precision", precision, "--target", target,
               "--controlnets", str(count), *(["--beside"] if beside else [])]
    _build_child(command, name)
    if not is_current(package):
        raise InputError(f"building preset {name!r} with {count} ControlNet(s) failed (see the log above); it needs "
                         "the `export` extra (torch, diffusers, transformers)")
    return package


def ensure_tiny_vae(name: str, package: Path) -> Path:
    """Add the tiny autoencoder (random TAESD weights) to preset `name`'s cached package, once (child process)."""
    if (package / "vae_decoder_tiny").is_dir():
        return package
    logger.info("preset %s: adding a random-weight tiny autoencoder (TAESD) to %s", name, package)
    command = [*BUILD_COMMAND, name, "--tiny-vae-into", str(package)]
    built = subprocess.run(command, stdout=subprocess.DEVNULL).returncode == 0
    if not built or not (package / "vae_decoder_tiny").is_dir():
        raise InputError(f"adding the tiny VAE to preset {name!r} failed (see the log above); it needs the `export` "
                         "extra (torch, diffusers)")
    return package


def build_tiny_vae(preset: Preset) -> Path:
    """diffusers' `AutoencoderTiny()` defaults are the published madebyollin/taesd (and taesdxl) config."""
    import diffusers
    import torch

    def write(folder: Path) -> None:
        torch.manual_seed(SEED)
        # mypy resolves diffusers' top-level names to its torch-less placeholders (utils.dummy_pt_objects)
        diffusers.AutoencoderTiny().eval().save_pretrained(  # type: ignore[attr-defined]
            folder, safe_serialization=True)

    return _build_folder(preset.tiny_vae, CONFIG_NAME, write)


def _build_folder(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """`target`, written by `write(folder)` into a temp folder beside it and renamed into place; kept if it exists
    (`target / marker` marks a finished build)."""
    if (target / marker).exists():
        return target
    with AtomicFolder(target) as folder:
        write(folder)
    return target


def _tokenizer(folder: Path, pad: str):
    from transformers import CLIPTokenizer

    from diffrt.bench.tokenizer_files import write_clip_tokenizer_files

    vocab, merges = write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(vocab), str(merges), pad_token=pad, model_max_length=77)


def _t5_tokenizer():
    """A T5 fast tokenizer (SentencePiece-style Unigram over letters, T5's <pad>=0, </s>=1, <unk>=2), built locally:
    the real one cannot be downloaded here, and the encoder's embedding keeps the published vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _text_encoder(config: dict[str, Any], tokenizer):
    import transformers

    config = dict(config)
    cls = getattr(transformers, config.pop("architectures")[0])
    if config.get("model_type") == "t5":
        return cls(transformers.T5Config(**config)).eval()
    # Special-token ids follow our tokenizer; the vocabulary size stays the published one (the embedding's size).
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return cls(transformers.CLIPTextConfig(**{**config, **ids})).eval()


def _tokenizer_for(spec: dict[str, Any], name: str, work: Path):
    """The tokenizer of text encoder `name` (`text_encoder_2` -> `tokenizer_2`): T5's or a CLIP BPE."""
    if spec[name].get("model_type") == "t5":
        return _t5_tokenizer()
    suffix = name[len("text_encoder"):]
    return _tokenizer(work / f"bpe{suffix}", spec[f"tokenizer{suffix}_pad"])


def make_model(spec: dict[str, Any], name: str, tokenizer: Any = None):
    """The random-weight model `name` of a preset spec (text encoders, `unet` / `transformer`, `vae`)."""
    import diffusers

    if name.startswith("text_encoder"):
        return _text_encoder(spec[name], tokenizer)
    config = dict(spec[name])
    default = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}.get(name, "")
    cls = getattr(diffusers, config.get("_class_name") or default)
    return cls.from_config(config).eval()


def _components(preset: Preset, work: Path) -> dict[str, Any]:
    """The pipeline's components, each model drawn at random and cast to the preset's `storage_dtype` right away
    (so a real-size checkpoint's float32 copies never exist together)."""
    import diffusers
    import torch

    spec = preset.spec
    dtype = getattr(torch, spec.get("storage_dtype", "float32"))
    parts: dict[str, Any] = {}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae"):
        if name not in spec:
            continue
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        if name not in preset.built:
            parts[name] = None
            parts[tokenizer_name] = None
            continue
        tokenizer = None
        if name.startswith("text_encoder"):
            tokenizer = parts[tokenizer_name] = _tokenizer_for(spec, name, work)
        parts[name] = make_model(spec, name, tokenizer).to(dtype)
        gc.collect()
    scheduler = dict(spec["scheduler"])
    parts["scheduler"] = getattr(diffusers, scheduler.pop("_class_name")).from_config(scheduler)
    if spec["pipeline"] == "StableDiffusionPipeline":
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts


def build_checkpoint(preset: Preset) -> Path:
    """Write the random-weight diffusers checkpoint of `preset` (atomically: temp folder, then rename)."""
    import diffusers
    import torch

    def write(folder: Path) -> None:
        start = time.perf_counter()
        torch.manual_seed(SEED)
        pipe = getattr(diffusers, preset.spec["pipeline"])(**_components(preset, folder / ".work"))
        params = sum(p.numel() for p in getattr(pipe, preset.denoiser).parameters())
        logger.info("preset %s: random weights ready (%s %.0fM parameters, %.0f s); writing checkpoint",
                    preset.name, preset.denoiser, params / 1e6, time.perf_counter() - start)
        pipe.save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / ".work", ignore_errors=True)
        del pipe
        gc.collect()

    return _build_folder(preset.checkpoint, INDEX_NAME, write)


def build_controlnet(preset: Preset, index: int) -> Path:
    """A random-weight ControlNet for the preset's UNet: Diffusers' `ControlNetModel.from_unet` (its encoder starts as
    a copy of the UNet's, as in training), with the zero-initialised convolutions drawn at random too, so the
    residuals it adds are not zeros and the image depends on every part of it."""
    import diffusers
    import torch

    def write(folder: Path) -> None:
        torch.manual_seed(SEED + 1 + index)
        unet = diffusers.UNet2DConditionModel.from_pretrained(preset.checkpoint / "unet")
        controlnet = diffusers.ControlNetModel.from_unet(unet)
        del unet
        with torch.no_grad():
            for parameter_name, parameter in controlnet.named_parameters():
                if parameter_name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                    parameter.normal_(0.0, 0.02)
        controlnet.eval().save_pretrained(folder, safe_serialization=True)

    build_checkpoint(preset)
    return _build_folder(preset.controlnet(index), CONFIG_NAME, write)


def build_controlnet_package(preset: Preset, count: int, precision: str = "fp32",
                             target: str = "onnxruntime") -> Path:
    """The preset's checkpoint exported with `count` ControlNets named `cn0`, `cn1`, ... (UNet with residual inputs)."""
    from diffrt.export import export_pipeline

    package = preset.controlnet_package(count, precision, target)
    if is_current(package):
        return package
    checkpoint = build_checkpoint(preset)
    specs = [f"cn{index}={build_controlnet(preset, index)}" for index in range(count)]
    start = time.perf_counter()
    export_pipeline(checkpoint, package, precision=precision, target=target, components=preset.exported,
                    controlnets=specs, overwrite=True)
    _stamp(package)
    logger.info("preset %s: exported with %d ControlNet(s) in %.0f s", preset.name, count, time.perf_counter() - start)
    return package


def build_package(preset: Preset, precision: str = "fp32", target: str = "onnxruntime",
                  deep_cache: bool = False) -> Path:
    """Build the checkpoint if needed, then export it to the cached package (the exporter writes atomically)."""
    from diffrt.export import export_pipeline

    package = preset.package(precision, target, deep_cache)
    if is_current(package):
        return package
    checkpoint = build_checkpoint(preset)
    start = time.perf_counter()
    logger.info("preset %s: exporting to %s (%s, %s)", preset.name, package, precision, target)
    export_pipeline(checkpoint, package, precision=precision, target=target, components=preset.exported,
                    validate=bool(preset.spec.get("export_validate", True)), overwrite=True, deep_cache=deep_cache)
    _stamp(package)
    logger.info("preset %s: exported in %.0f s", preset.name, time.perf_counter() - start)
    return package
