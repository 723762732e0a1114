"""Training loops of the digits model: the VAE first, then the UNet and text encoder together on frozen latents.

Single-threaded torch with explicit generators, so a seed reproduces the run bit for bit on the same machine.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from digits import data

logger = logging.getLogger(__name__)
KL_WEIGHT = 1e-5  # keeps the posterior a proper Gaussian without blurring 8x8-pixel strokes
CAPTION_DROPOUT = 0.1  # empty captions teach the unconditional branch that classifier-free guidance needs
MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al. 2023): ~3x faster convergence at equal quality


def _schedule(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + np.cos(np.pi * progress)))


def _log_every(step: int, steps: int, name: str, losses: list[float], start: float) -> None:
    if step % 50 == 0 or step == steps - 1:
        logger.info("%s step %d/%d loss %.4f (%.0f s)", name, step, steps, np.mean(losses[-50:]),
                    time.perf_counter() - start)


def train_vae(vae: Any, images: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator) -> list[float]:
    """Reconstruction (MSE) + a small KL term, on random batches of the training images."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    vae.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, steps, lr, warmup=20)
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        _log_every(step, steps, "vae", losses, start)
    vae.eval()
    return losses


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image; the caller sets `scaling_factor` from them."""
    posterior = [vae.encode(chunk).latent_dist for chunk in images.split(128)]
    return torch.cat([p.mean for p in posterior]), torch.cat([p.std for p in posterior])


class Ema:
    """Exponential moving average of a module's parameters (the shipped weights are the average)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights are noise
        for avg, param in zip(self.shadow.parameters(), module.parameters()):
            avg.lerp_(param, 1 - decay)


def _captions(labels: np.ndarray, styles: list[str], rng: np.random.Generator) -> list[str]:
    return ["" if rng.random() < CAPTION_DROPOUT else data.caption(int(y), s, rng) for y, s in zip(labels, styles)]


def _min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr


def train_unet(unet: Any, text_encoder: Any, tokenize: Callable[[list[str]], torch.Tensor], scheduler: Any,
               latents: tuple[torch.Tensor, torch.Tensor], labels: np.ndarray, styles: list[str], *, steps: int,
               batch: int, lr: float, seed: int) -> tuple[list[float], Ema, Ema]:
    """Epsilon-prediction training with Min-SNR weighting; returns the losses and the EMA of both models."""
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema_unet, ema_text = Ema(unet, 0.995), Ema(text_encoder, 0.995)
    alphas_cumprod = scheduler.alphas_cumprod
    mean, std = latents
    losses: list[float] = []
    start = time.perf_counter()
    unet.train(), text_encoder.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, steps, lr, warmup=50)
        index = torch.randint(0, len(mean), (batch,), generator=gen)
        x0 = mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=gen)
        ids = tokenize(_captions(labels[index.numpy()], [styles[i] for i in index.tolist()], rng))
        pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * _min_snr_weight(alphas_cumprod, t)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_unet.update(unet, step), ema_text.update(text_encoder, step)
        losses.append(loss.item())
        _log_every(step, steps, "unet", losses, start)
    return losses, ema_unet, ema_text
