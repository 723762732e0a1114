"""Which autoencoder a pipeline runs: the package's VAE (`vae="full"`) or its tiny one (`vae="tiny"`, TAESD).

The tiny components are what Diffusers runs after `pipe.vae = AutoencoderTiny(...)`: the decoder takes the
diffusion latents directly (scaling_factor 1.0, no shift) and the encoder returns latents, not a distribution
(`retrieve_latents` takes `.latents`; nothing is sampled, the generator is not drawn from).
"""
from __future__ import annotations

from typing import Any, Sequence

from diffrt.errors import PackageError, invalid
from diffrt.package.reader import ModelPackage

VAE_CHOICES = ("full", "tiny")
TINY_COMPONENTS = {"vae_decoder": "vae_decoder_tiny", "vae_encoder": "vae_encoder_tiny"}
# AutoencoderTiny's own defaults, for a tiny config.json written without them (diffrt writes them all).
TINY_DEFAULTS = {"scaling_factor": 1.0, "shift_factor": 0.0}


def check_vae(vae: Any) -> str:
    if not isinstance(vae, str) or vae not in VAE_CHOICES:
        raise invalid("vae", "'full' or 'tiny'", vae)
    return vae


def vae_components(package: ModelPackage, vae: Any, required: Sequence[str]) -> dict[str, str]:
    """VAE role (vae_decoder / vae_encoder) -> the package component that plays it; errors before any engine."""
    if check_vae(vae) == "full":
        return {role: role for role in TINY_COMPONENTS}
    missing = [TINY_COMPONENTS[role] for role in TINY_COMPONENTS if role in required
               and not package.has(TINY_COMPONENTS[role])]
    if missing:
        raise PackageError(
            f"package {package.root} has no {' / '.join(missing)} component, needed for vae='tiny': export it with "
            f"`diffrt export SOURCE OUTPUT --tiny-vae TAESD` or add it with `diffrt export --tiny-vae TAESD --into "
            f"{package.root}`"
        )
    return dict(TINY_COMPONENTS)


def vae_config(package: ModelPackage, components: dict[str, str]) -> dict[str, Any]:
    """The config of the chosen autoencoder (scaling_factor, block_out_channels, ...)."""
    if components["vae_decoder"] == "vae_decoder":
        return package.vae_config
    return {**TINY_DEFAULTS, **package.component(components["vae_decoder"]).config}
