"""The pipeline's components as Diffusers scripts reach them: `pipe.unet`, `pipe.text_encoder`, `pipe.vae`, ...

Each is a thin view over the package component and the pipeline's shared engine (created on first use, so reading
`pipe.unet.config` costs nothing): `.config` reads like Diffusers' `FrozenDict` (`pipe.unet.config.sample_size`,
`pipe.vae.config.scaling_factor`), calling a component runs its engine on NumPy feeds (as Diffusers'
`OnnxRuntimeModel` does). `pipe.vae` is the autoencoder the pipeline runs (the package's VAE, or its tiny one with
`vae="tiny"`), with AutoencoderKL's `decode(z).sample` and `encode(x).latent_dist` on NumPy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from diffrt import rng
from diffrt.runtime.engines.base import Engine

if TYPE_CHECKING:
    from diffrt.runtime.pipelines.base import DiffusionPipeline


class ConfigDict(dict):
    """A read-only dict whose keys are also attributes, like Diffusers' `FrozenDict` (`config.sample_size`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no {name!r}") from None

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a pipeline component's config is read-only (it describes the exported model)")

    __setitem__ = __delitem__ = __setattr__ = _read_only
    update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]


class EngineComponent:
    """One ONNX component of the package (`unet`, `text_encoder`, `vae_decoder`, ...) and its engine."""

    def __init__(self, pipeline: "DiffusionPipeline", name: str, config: Mapping[str, Any] | None = None) -> None:
        self._pipeline = pipeline
        self.name = name
        info = pipeline.package.component(name)
        self.config = ConfigDict(config if config is not None else info.config)
        self.model_path = info.path

    @property
    def engine(self) -> Engine:
        """The engine the pipeline runs for this component (created on first use, then shared)."""
        return self._pipeline.engine(self.name)

    def __call__(self, **feeds: Any) -> dict[str, np.ndarray]:
        """Run the engine: input name -> NumPy array, returns output name -> array."""
        return self.engine.run({name: np.asarray(value) for name, value in feeds.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.model_path})"


@dataclass
class DecoderOutput:
    sample: np.ndarray


@dataclass
class DiagonalGaussianDistribution:
    """The VAE encoder's latent distribution (Diffusers' class): `sample(generator)` and `mode()`."""

    mean: np.ndarray
    logvar: np.ndarray

    @property
    def std(self) -> np.ndarray:
        return np.exp(np.float32(0.5) * self.logvar)

    def sample(self, generator: Any = None) -> np.ndarray:
        return self.mean + self.std * rng.randn(self.mean.shape, generator=generator)

    def mode(self) -> np.ndarray:
        return self.mean


@dataclass
class AutoencoderKLOutput:
    latent_dist: DiagonalGaussianDistribution


@dataclass
class AutoencoderTinyOutput:
    latents: np.ndarray


class AutoencoderComponent:
    """`pipe.vae`: the decoder and (when the package has one) the encoder of the autoencoder this pipeline runs."""

    def __init__(self, pipeline: "DiffusionPipeline", components: Mapping[str, str], config: Mapping[str, Any],
                 kind: str) -> None:
        self._pipeline = pipeline
        self.kind = kind  # "full" or "tiny"
        self.config = ConfigDict(config)
        self.decoder_name = components["vae_decoder"]
        self.encoder_name = components["vae_encoder"]

    def decode(self, latent_sample: np.ndarray, return_dict: bool = True) -> Any:
        """Latents (already divided by `scaling_factor`, as in Diffusers) -> images NCHW in [-1, 1], float32."""
        engine = self._pipeline.engine(self.decoder_name)
        release = self._pipeline.release_memory
        image = engine.run({"latent_sample": _as(engine, "latent_sample", latent_sample)}, release)["sample"]
        image = np.asarray(image, dtype=np.float32)
        return DecoderOutput(image) if return_dict else (image,)

    def encode(self, x: np.ndarray, return_dict: bool = True) -> Any:
        """Images NCHW in [-1, 1] -> `latent_dist` (tiny VAE: `latents`, nothing to sample), as Diffusers."""
        engine = self._pipeline.engine(self.encoder_name)
        out = engine.run({"sample": _as(engine, "sample", x)}, self._pipeline.release_memory)
        if self.kind == "tiny":
            latents = np.asarray(out["latents"], np.float32)
            return AutoencoderTinyOutput(latents) if return_dict else (latents,)
        moments = np.asarray(out["latent_parameters"], np.float32)
        mean, logvar = np.split(moments, 2, axis=1)
        dist = DiagonalGaussianDistribution(mean, np.clip(logvar, -30.0, 20.0))
        return AutoencoderKLOutput(dist) if return_dict else (dist,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r}, decoder={self.decoder_name!r})"


def _as(engine: Engine, name: str, array: np.ndarray) -> np.ndarray:
    dtype = next(s.dtype for s in engine.inputs if s.name == name)
    return np.asarray(array).astype(dtype, copy=False)
