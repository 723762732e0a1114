"""Convolutional building blocks shared by our UNet and VAE: activations, timestep embeddings, resnets, resamplers,
and `ConfiguredModel`, the config and weight-loading base of our top-level models.

Parameter names and shapes follow diffusers (`resnet.py`, `embeddings.py`, `downsampling.py`, `upsampling.py`) so a
diffusers state dict loads strictly; the forward passes keep diffusers' arithmetic order so outputs match closely.
Dropout is left out on purpose: these modules exist to be exported for inference.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from diffrt.errors import ConfigError, ExportError, InputError, invalid

logger = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound="ConfiguredModel")

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def activation(name: str, key: str = "act_fn") -> nn.Module:
    """diffusers' `get_activation`: the module for an activation name (case-insensitive)."""
    factory = ACTIVATIONS.get(str(name).lower())
    if factory is None:
        raise invalid(key, f"one of {sorted(ACTIVATIONS)}", name, cls=ConfigError)
    return factory()


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float, max_period: int = 10000
) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim] in float32, in diffusers' `get_timestep_embedding` operation order."""
    half_dim = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    else:
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    """Parameter-free sinusoidal projection (diffusers `Timesteps`); output is float32."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on an embedding, with the optional LCM guidance projection `cond_proj`."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = activation(post_act_fn, "timestep_post_act") if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None and self.cond_proj is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, timestep bias added between ("default" time scale shift), optional 1x1 shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        act_fn: str = "silu",
        output_scale_factor: float = 1.0,
        groups_out: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None and temb is not None:
            hidden = hidden + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
        hidden = self.conv2(self.nonlinearity(self.norm2(hidden)))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        output = shortcut + hidden
        # A division by 1.0 would only add a node to the exported graph.
        return output / self.output_scale_factor if self.output_scale_factor != 1.0 else output


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 is the VAE encoder's asymmetric variant: pad right/bottom by one first."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv.

    `output_size` forces the spatial size; the UNet passes its skip connection's size so latents whose sides are not
    multiples of the total downsampling factor come back to the right shape (diffusers' `upsample_size`).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        return self.conv(hidden_states)


class DownBlock(nn.Module):
    """Resnets, each optionally followed by a spatial transformer, then an optional downsampler.

    Covers diffusers' DownBlock2D, CrossAttnDownBlock2D and DownEncoderBlock2D (attentions=None, temb=None).
    Returns the output and the per-layer states the UNet keeps as skip connections.
    """

    def __init__(
        self, resnets: Sequence[nn.Module], attentions: Sequence[nn.Module] | None, downsample: nn.Module | None
    ):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions is not None else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample is not None else None

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None,
        stop: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`stop`: return after the first `stop` states (DeepCache's shallow UNet pass needs the shallowest skip
        connections only); None runs the whole block."""
        states: list[torch.Tensor] = []
        for i, resnet in enumerate(self.resnets):
            if stop is not None and len(states) >= stop:
                return hidden_states, states
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states, context)
            states.append(hidden_states)
        if self.downsamplers is not None and (stop is None or len(states) < stop):
            hidden_states = self.downsamplers[0](hidden_states)
            states.append(hidden_states)
        return hidden_states, states


def _jsonable(value: Any) -> Any:
    """Tuples become lists, as in a diffusers `config.json`."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class ConfiguredModel(nn.Module):
    """What our models share with diffusers' ModelMixin: a config dict, `from_config`, strict weight loading.

    Subclasses set `config_defaults` (diffusers' constructor keywords and defaults) and call `resolve_config`.
    """

    config_defaults: ClassVar[dict[str, Any]] = {}
    weights_name: ClassVar[str] = "diffusion_pytorch_model"
    _config: dict[str, Any]  # the resolved config, set by each subclass's __init__

    @classmethod
    def resolve_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with `config`; `_`-prefixed metadata is dropped, unknown keys are logged and dropped."""
        resolved = {key: _jsonable(value) for key, value in cls.config_defaults.items()}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in resolved:
                logger.warning("%s ignores unknown config key %r (value %r)", cls.__name__, key, value)
                continue
            resolved[key] = _jsonable(value)
        return resolved

    @classmethod
    def from_config(cls: type[ModelT], config: Mapping[str, Any]) -> ModelT:
        """Build from a diffusers `config.json` dict (random weights)."""
        return cls(**config)

    @classmethod
    def from_state_dict(
        cls: type[ModelT],
        config: Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
    ) -> ModelT:
        """Build from a config and a diffusers-named state dict, loaded strictly; no weights are allocated twice."""
        with torch.device("meta"):
            model = cls.from_config(config)
        state_dict = cls.convert_state_dict(dict(state_dict))
        try:
            model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as error:
            raise ExportError(f"{cls.__name__} weights do not match its config: {error}") from error
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    @classmethod
    def convert_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook to rename legacy keys before loading; identity by default."""
        return state_dict

    @classmethod
    def from_pretrained(
        cls: type[ModelT],
        folder: str | Path,
        subfolder: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ModelT:
        """Load a diffusers model folder: `config.json` + `diffusion_pytorch_model[.variant].safetensors`.

        Falls back to a sharded `.safetensors.index.json`, then to `.bin` (read with `weights_only=True`).
        """
        path = Path(folder) / subfolder if subfolder else Path(folder)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise invalid("folder", "a diffusers model folder containing config.json", str(path))
        config = json.loads(config_file.read_text())
        return cls.from_state_dict(config, _read_weights(path, cls.weights_name, variant, dtype), dtype=dtype)

    @property
    def config(self) -> dict[str, Any]:
        """The full resolved config (diffusers keys, defaults filled in); a copy, so callers cannot desync the model."""
        return copy.deepcopy(self._config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _read_weights(path: Path, weights_name: str, variant: str | None,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's weights, floating-point tensors converted to `dtype` one by one as they are read: the file's
    copy of a tensor is dropped before the next is read, so loading never holds the checkpoint's bf16 / fp16 tensors
    and their float32 copies at once (measured on SD 3.5 medium's transformer: 14.4 GiB peak that way, for 9.9 GB
    of float32 weights; docs/benchmarks.md)."""
    stem = f"{weights_name}.{variant}" if variant else weights_name
    single, index, legacy = path / f"{stem}.safetensors", path / f"{stem}.safetensors.index.json", path / f"{stem}.bin"
    if single.is_file():
        return _read_safetensors([single], dtype)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return _read_safetensors([path / shard for shard in shards], dtype)
    if legacy.is_file():
        state = torch.load(str(legacy), map_location="cpu", weights_only=True)
        return {key: _as(value, dtype) for key, value in state.items()}
    present = sorted(p.name for p in path.iterdir())
    raise InputError(f"`folder` must contain {single.name}, {index.name} or {legacy.name}; got {present}")


def _read_safetensors(files: Sequence[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                state[key] = _as(handle.get_tensor(key), dtype)
    return state


def _as(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
