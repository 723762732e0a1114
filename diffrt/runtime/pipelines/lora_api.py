"""Diffusers' LoRA API on a diffrt pipeline: load_lora_weights, set_adapters, disable / enable_lora, fuse / unfuse,
unload_lora_weights, get_active_adapters, get_list_adapters, delete_adapters.

Adapters become initializer overrides of the engines they touch (`diffrt.runtime.adapters.state`): every change
re-creates only the engines whose weights change (a UNet-only LoRA leaves the text encoder's session alone), right
away, so the next call runs at full speed. Only engines that exist are re-created; the others are created with the
adapters when first used.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from diffrt.errors import InputError, invalid
from diffrt.runtime.adapters.lora_file import read_lora
from diffrt.runtime.adapters.state import AdapterState, Weight

if TYPE_CHECKING:
    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.engines.base import Engine
    from diffrt.runtime.pipelines.diffusers_api import CallState

logger = logging.getLogger(__name__)

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # Diffusers' save_lora_weights file name


def _is_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".safetensors")


def check_lora_source(path_or_repo: str | Path, what: str = "LoRA",
                      default_name: str = DEFAULT_WEIGHT_NAME) -> None:
    """InputError for an adapter argument that is no existing file or folder and cannot be a Hub repo id (checked
    before any model is loaded)."""
    path = Path(path_or_repo).expanduser()
    if not path.exists() and not _is_repo_id(str(path_or_repo)):
        raise InputError(f"{what} file {os.fsdecode(path)} does not exist (expected a .safetensors file, a folder "
                         f"with {default_name} or a Hub repo id)")


def resolve_adapter_file(path_or_repo: str | Path, weight_name: str, what: str = "LoRA", **hub: Any) -> Path:
    """An adapter file from a file path, a folder (+ `weight_name`), or a Hub repo id (+ `weight_name`)."""
    check_lora_source(path_or_repo, what, weight_name)
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return path
    name = weight_name
    if path.is_dir():
        if not (path / name).is_file():
            raise InputError(f"{what} folder {os.fsdecode(path)} has no {name}; pass `weight_name` with the file to "
                             "load")
        return path / name
    from huggingface_hub import hf_hub_download

    from diffrt.runtime.hub import hub_call

    repo = str(path_or_repo)
    return Path(hub_call(lambda: hf_hub_download(repo, name, **hub), repo, hub.get("revision"),
                         f"the {what} file {name}", InputError))


class LoraLoaderMixin:
    """Mixed into `DiffusionPipeline`; state lives in `self.adapters` (shared with `from_pipe` pipelines)."""

    adapters: AdapterState
    provider: Any
    package: "ModelPackage"
    _engines: dict[str, "Engine"]
    _engine_signatures: dict[str, Any]
    _lock: threading.Lock
    _call: "CallState"

    def engine(self, name: str) -> "Engine":
        raise NotImplementedError  # DiffusionPipeline.engine

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | Path,
                          adapter_name: str | None = None, *, weight_name: str | None = None, strict: bool = True,
                          **hub: Any) -> None:
        """Load a LoRA (kohya / A1111, Diffusers / PEFT; safetensors only) as `adapter_name` and make it the active
        adapter at weight 1, as Diffusers does. `strict=False` skips keys matching no weight of this package
        (with a warning) instead of refusing the file. Hub keywords (`revision`, `token`, `cache_dir`, ...) go to
        `hf_hub_download`."""
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            raise invalid("pretrained_model_name_or_path_or_dict", "a .safetensors file, a folder or a Hub repo id "
                          "(diffrt does not take torch state dicts)", "a dict")
        if adapter_name is None:
            adapter_name = f"default_{len(self.adapters.loras)}"
        if adapter_name in self.adapters.loras:
            raise invalid("adapter_name", "a name not loaded yet (delete_adapters first to replace it)", adapter_name)
        self._check_engines_support_adapters()
        path = resolve_adapter_file(pretrained_model_name_or_path_or_dict, weight_name or DEFAULT_WEIGHT_NAME, **hub)
        layers = self.adapters.weights.package.unet_config.get("layers_per_block") \
            if self.adapters.weights.package.has("unet") else None
        lora = read_lora(path, self.adapters.weights.parameter_names(), strict=strict,
                         layers_per_block=layers if isinstance(layers, int) else None)
        with self._lock:
            self.adapters.loras[adapter_name] = lora
            self.adapters.active = [(adapter_name, 1.0)]
        self._refresh_adapted_engines()

    def set_adapters(self, adapter_names: str | Sequence[str],
                     adapter_weights: Weight | Sequence[Weight | None] | None = None) -> None:
        """Activate `adapter_names` with `adapter_weights` (one number per adapter or for all, or a dict per
        component such as {"unet": 0.6, "text_encoder": 1.0}; None = 1.0); their updates add up."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [name for name in names if name not in self.adapters.loras]
        if unknown:
            raise invalid("adapter_names", f"loaded adapters ({', '.join(self.adapters.loras) or 'none loaded'})",
                          unknown[0])
        if adapter_weights is None or isinstance(adapter_weights, (int, float, dict)):
            weights: list[Any] = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
        if len(weights) != len(names):
            raise invalid("adapter_weights", f"one weight per adapter ({len(names)})", len(weights))
        checked = [_check_weight(1.0 if weight is None else weight) for weight in weights]
        with self._lock:
            self.adapters.active = list(zip(names, checked))
            self.adapters.enabled = True
        self._refresh_adapted_engines()

    def get_active_adapters(self) -> list[str]:
        return [name for name, _ in self.adapters.active] if self.adapters.enabled else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        listed: dict[str, list[str]] = {}
        for name, lora in self.adapters.loras.items():
            for component in sorted(lora.components):
                listed.setdefault(component, []).append(name)
        return listed

    def disable_lora(self) -> None:
        """Run without the active adapters (fused ones stay); `enable_lora` brings them back."""
        self.adapters.enabled = False
        self._refresh_adapted_engines()

    def enable_lora(self) -> None:
        self.adapters.enabled = True
        self._refresh_adapted_engines()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.adapters.loras:
                raise invalid("adapter_names", f"loaded adapters ({', '.join(self.adapters.loras)})", name)
        with self._lock:
            for name in names:
                del self.adapters.loras[name]
            self.adapters.active = [(n, w) for n, w in self.adapters.active if n not in names]
        self._refresh_adapted_engines()

    def unload_lora_weights(self) -> None:
        """Forget every adapter: the engines run the package's own weights again (plus anything fused)."""
        with self._lock:
            self.adapters.loras.clear()
            self.adapters.active = []
        self._refresh_adapted_engines()

    def fuse_lora(self, lora_scale: float = 1.0,
                  adapter_names: Sequence[str] | None = None, **_: Any) -> None:
        """Bake the active adapters (times `lora_scale`) into the weights: they stay after `unload_lora_weights`
        until `unfuse_lora`. (Inference costs the same either way: adapters are always merged into the weights.)"""
        scale = _check_weight(lora_scale, "lora_scale")
        chosen = self.get_active_adapters() if adapter_names is None else list(adapter_names)
        with self._lock:
            for name, weight in self.adapters.active:
                if name in chosen and isinstance(weight, (int, float)) and isinstance(scale, float):
                    self.adapters.fused.append((self.adapters.loras[name], name, float(weight) * scale))
                elif name in chosen:
                    raise invalid("adapter_weights", "one number per adapter to fuse", weight)
        self._refresh_adapted_engines()

    def unfuse_lora(self, **_: Any) -> None:
        with self._lock:
            self.adapters.fused.clear()
        self._refresh_adapted_engines()

    # ----- engines -----
    def _check_engines_support_adapters(self) -> None:
        from diffrt.runtime.engines import check_initializer_overrides

        check_initializer_overrides(self.provider, self.package, self.adapters.weights.components())

    def _refresh_adapted_engines(self) -> float:
        """Re-create the existing engines whose adapter overrides changed; returns the seconds it took."""
        start = time.perf_counter()
        for name in self.adapters.weights.components():
            engine = self._engines.get(name)
            if engine is not None and self._engine_signatures.get(name) != self.adapters.signature(name):
                with self._lock:
                    self._engines.pop(name, None)
                close = getattr(engine, "close", None)
                if close is not None:
                    close()
                self.engine(name)
                logger.info("re-created the %s engine with the new adapters", name)
        self._call.load_seconds = 0.0
        return time.perf_counter() - start


def _check_weight(value: Any, name: str = "adapter_weights") -> Weight:
    import math

    if isinstance(value, dict):
        return {str(k): float(_check_weight(v, name)) for k, v in value.items()}  # type: ignore[arg-type]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, "a finite number (or a dict of them per component)", value)
    return float(value)
