"""Classifier-free guidance arithmetic, in float32 NumPy, as the Diffusers pipelines do it."""
from __future__ import annotations

import numpy as np


def combine_cfg(noise_pred: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0) -> np.ndarray:
    """Split [uncond; text] and apply `uncond + g * (text - uncond)`, then optional guidance rescale."""
    uncond, text = np.split(noise_pred, 2, axis=0)
    guided = uncond + np.float32(guidance_scale) * (text - uncond)
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, text, guidance_rescale)
    return guided


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_text: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """Section 3.4 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al., 2023).

    torch.std is the unbiased estimator, hence ddof=1.
    """
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    g = np.float32(guidance_rescale)
    return (g * rescaled + (np.float32(1.0) - g) * noise_cfg).astype(np.float32, copy=False)


def guidance_scale_embedding(w: np.ndarray, embedding_dim: int) -> np.ndarray:
    """Sinusoidal embedding of the guidance weight for guidance-distilled (LCM) UNets' `timestep_cond`.

    From VDM (https://github.com/google-research/vdm); float32 throughout like Diffusers.
    """
    w = np.asarray(w, dtype=np.float32) * np.float32(1000.0)
    half_dim = embedding_dim // 2
    scale = np.float32(np.log(np.float32(10000.0))) / np.float32(half_dim - 1)
    freqs = np.exp(np.arange(half_dim, dtype=np.float32) * -scale)
    args = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32, copy=False)
