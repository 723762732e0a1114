"""The parts of Diffusers' `DiffusionPipeline` object that scripts use besides `__call__`, on a diffrt pipeline.

`.components`, `.config`, `.device`, `.to(provider)`, `save_pretrained`, `progress_bar` /
`set_progress_bar_config`, and the per-call state Diffusers exposes to callbacks: `num_timesteps`, `interrupt`
(set `pipe._interrupt = True` in `callback_on_step_end` to skip the remaining steps, as in Diffusers' docs),
`guidance_scale`, `do_classifier_free_guidance`. The per-call state is per thread, so one pipeline still serves
concurrent calls: a callback interrupting one call does not stop the others.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from tqdm.auto import tqdm

from diffrt.errors import InputError, invalid
from diffrt.package.files import AtomicFolder, read_json, write_json
from diffrt.package.names import INDEX_NAME, SCHEDULER_CONFIG
from diffrt.runtime.pipelines.components import ConfigDict
from diffrt.runtime.pipelines.providers import (
    GPU_PROVIDER_NAMES,
    check_package_target,
    check_provider,
    provider_name,
)

if TYPE_CHECKING:
    from diffrt.package.reader import ModelPackage

logger = logging.getLogger(__name__)

class CallState(threading.local):
    """What Diffusers keeps on the pipeline during a call (`self._interrupt`, `self._num_timesteps`, ...)."""

    interrupt: bool = False
    num_timesteps: int | None = None
    guidance_scale: float | None = None
    do_classifier_free_guidance: bool | None = None
    load_seconds: float = 0.0  # engine creation inside this thread's stages, reported as the "load" stage


class DiffusersApi:
    """Mixed into `DiffusionPipeline`; reads the attributes the pipeline sets up in `__init__`."""

    package: "ModelPackage"
    provider: Any
    engine_options: dict[str, Any]
    scheduler: Any
    _call: CallState
    _engines: dict[str, Any]
    _lock: threading.Lock
    _progress_bar_config: dict[str, Any]
    #: the Diffusers component names of this pipeline class (`.components`), torch-only ones left out
    component_names: tuple[str, ...] = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    # ----- what the pipeline is made of -----
    @property
    def components(self) -> dict[str, Any]:
        """Component name -> object, as Diffusers' `pipe.components` (None for one the package does not have)."""
        return {name: getattr(self, name, None) for name in self.component_names}

    @property
    def config(self) -> ConfigDict:
        """The package's `model_index.json` (`_class_name`, `_diffusers_version`, the component entries)."""
        return ConfigDict({**self.package.index, "_name_or_path": str(self.package.root)})

    @property
    def name_or_path(self) -> str:
        return str(self.package.root)

    @property
    def device(self) -> str:
        """Where the engines run: "cuda:N" for the CUDA and TensorRT providers, else "cpu" (a string: no torch)."""
        name = provider_name(self.provider)
        if name == "auto":
            from diffrt.runtime.engines import auto_provider

            name = auto_provider().lower()
        if name in GPU_PROVIDER_NAMES:
            return f"cuda:{int(self.engine_options.get('device_id', 0))}"
        return "cpu"

    def to(self, provider: Any = None, dtype: Any = None, **engine_options: Any) -> Any:
        """Run on another provider from now on (`pipe.to("cuda")`, `pipe.to("cuda:1")`, `pipe.to("openvino")`);
        the engines are created again on the next call. Returns the pipeline, as Diffusers does. The dtype is
        fixed when the package is exported (`diffrt export --precision`), so `dtype` must stay None."""
        if dtype is not None:
            raise invalid("dtype", "None: a package's precision is chosen at export (`diffrt export --precision`)",
                          dtype)
        if provider is None:
            return self
        if isinstance(provider, str) and ":" in provider:
            provider, index = provider.split(":", 1)
            if not index.isdigit():
                raise invalid("provider", "a provider name, or 'cuda:N' with a device number", f"{provider}:{index}")
            engine_options = {**engine_options, "device_id": int(index)}
        check_provider(provider)
        check_package_target(self.package, provider)
        self.provider = provider
        self.engine_options = {**self.engine_options, **engine_options}
        self.release_engines()
        return self

    def release_engines(self) -> None:
        """Forget every engine (they are created again when next needed); the memory goes with the last user."""
        with self._lock:
            self._engines = {}

    # ----- saving -----
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write this pipeline's package to `save_directory` with its current scheduler (Diffusers'
        `save_pretrained`): a copy of every file (Hub-cache symlinks resolved), the scheduler config and the
        `model_index.json` scheduler entry of `pipe.scheduler`. The folder is written beside the target and
        renamed into place; an existing target is replaced only if it is a model package or empty."""
        target = Path(save_directory)
        source = self.package.root
        _check_save_target(source, target)
        with AtomicFolder(target, check=lambda: _check_save_target(source, target)) as folder:
            for entry in sorted(source.iterdir()):
                if entry.name.startswith("."):
                    continue  # stale temp folders of an interrupted write, never part of the package
                if entry.is_dir():
                    shutil.copytree(entry, folder / entry.name, symlinks=False)
                else:
                    shutil.copyfile(entry, folder / entry.name)
            self.scheduler.save_config(folder / Path(SCHEDULER_CONFIG).parent)
            index = read_json(folder / INDEX_NAME, required=True)
            if "scheduler" in index:
                index["scheduler"] = [index["scheduler"][0] if index["scheduler"] else "diffusers",
                                      type(self.scheduler).__name__]
                write_json(folder / INDEX_NAME, index)
        logger.info("saved the pipeline to %s", target)
        return target

    # ----- progress -----
    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the denoising progress bar (`disable=True` to hide it), as in Diffusers."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Iterable[Any] | None = None, total: int | None = None) -> Any:
        """A tqdm bar over `iterable` (or of `total` steps) with this pipeline's progress-bar config."""
        config = {"leave": False, **self._progress_bar_config}
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise InputError("pass `iterable` or `total` to `progress_bar`")

    # ----- this call's state (Diffusers' properties) -----
    @property
    def num_timesteps(self) -> int | None:
        """The number of denoising steps of the current (or last) call in this thread."""
        return self._call.num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._call.interrupt

    @property
    def _interrupt(self) -> bool:
        return self._call.interrupt

    @_interrupt.setter
    def _interrupt(self, value: bool) -> None:
        self._call.interrupt = bool(value)

    @property
    def guidance_scale(self) -> float | None:
        return self._call.guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool | None:
        return self._call.do_classifier_free_guidance


def _check_save_target(source: Path, target: Path) -> None:
    """Never write over the package itself, into it, around it, or over a folder that is not a model package."""
    source_real, target_real = source.resolve(), target.resolve()
    if source_real == target_real or source_real in target_real.parents or target_real in source_real.parents:
        raise InputError(
            f"`save_directory` {target} is the pipeline's own package {source}, inside it or around it; "
            "save to a separate folder"
        )
    if target.exists() and not target.is_dir():
        raise InputError(f"`save_directory` {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / INDEX_NAME).is_file():
        raise InputError(
            f"`save_directory` {target} holds files and is not a model package (no {INDEX_NAME}): "
            "refusing to replace it; pass an empty or new folder"
        )

