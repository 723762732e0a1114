"""Random-weight LoRA files on a package's own weight shapes, in a real file layout, for benchmarks and runnable
examples (nothing downloaded; the weights mean nothing, the sizes and keys are real). Needs `safetensors`.

Layouts (kohya keys: `lora_unet_<module>` / `lora_te_<module>`, the Diffusers module path with `_` for `.`):
- `SD15_STYLE`: a typical SD 1.5 style LoRA: every attention projection, feed-forward and proj_in / proj_out of the
  UNet, q / k / v / out / fc1 / fc2 of the text encoder.
- `LCM_LORA`: latent-consistency/lcm-lora-sdv1-5's layout: UNet only, attention, feed-forward, proj_in / proj_out,
  every resnet convolution, shortcut and time projection and the samplers' convolutions (the training scripts'
  `get_module_kohya_state_dict` in Diffusers' module names, for SD 1.5 and SDXL alike).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from diffrt.package.weights import LAYOUT_TRANSPOSED

ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
#: {component: (key prefix, module-name endings)}
SD15_STYLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("lora_unet_", ATTENTION),
    "text_encoder": ("lora_te_", ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
}
LCM_LORA: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("lora_unet_", ATTENTION + ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                                        "upsamplers.0.conv")),
}


def write_random_lora(package: str | Path, out: str | Path, rank: int = 32,
                      layout: Mapping[str, tuple[str, tuple[str, ...]]] = SD15_STYLE, seed: int = 0,
                      std: float = 0.01) -> Path:
    """A kohya-format LoRA file `out` (fp16, `.alpha` = rank / 2) for the package's modules that `layout` names;
    convolutions get LoCon factors (down [r, in, kh, kw], up [out, r, 1, 1]). Returns `out`."""
    from safetensors.numpy import save_file

    from diffrt.package.reader import ModelPackage
    from diffrt.runtime.adapters.package_weights import PackageWeights

    weights = PackageWeights(ModelPackage.open(package))
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for component, (prefix, endings) in layout.items():
        for parameter, places in weights.placements(component).items():
            module = parameter.removesuffix(".weight")
            if not parameter.endswith(".weight") or not module.endswith(endings):
                continue
            base = weights.base(component, places[0].initializer)
            shape = base.shape[::-1] if places[0].layout == LAYOUT_TRANSPOSED else base.shape
            kernel = tuple(shape[2:]) if len(shape) == 4 else ()
            down = rng.standard_normal((rank, int(np.prod(shape[1:])))) * std
            up = rng.standard_normal((shape[0], rank)) * std
            key = prefix + module.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.reshape(rank, *shape[1:2], *kernel).astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = up.reshape(shape[0], rank, *(1,) * len(kernel)).astype(np.float16)
            tensors[f"{key}.alpha"] = np.asarray(rank / 2, dtype=np.float16)
    out = Path(out)
    save_file(tensors, str(out))
    return out
