"""Train the built-in `digits` text-to-image model on scikit-learn's handwritten digits, on one CPU core.

    python3 scripts/train_digits.py train      # -> tests/data/digits_checkpoint and diffrt/builtin_packages/digits
    python3 scripts/train_digits.py evaluate   # oracle accuracy of the shipped package (20 steps; AYS 10 steps)
    python3 scripts/train_digits.py grid       # docs/digits.png: 10 digits x 8 seeds

Stages: AutoencoderKL on 32x32 images -> latents (8x8x4); UNet2DConditionModel + CLIPTextModel jointly on captions
such as "a handwritten seven" / "the digit 7" / "number seven, bold"; the EMA weights are saved as a diffusers
checkpoint folder and exported with `diffrt.export.export_pipeline` into the package that ships in the wheel.
See docs/digits.md for the numbers of the reference run.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("train_digits")
CHECKPOINT = ROOT / "tests" / "data" / "digits_checkpoint"
PACKAGE = ROOT / "diffrt" / "builtin_packages" / "digits"
CURVE = ROOT / "docs" / "digits_training.png"
GRID = ROOT / "docs" / "digits.png"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="train", choices=("train", "evaluate", "grid"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, and fastest on a "
                        "shared machine)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--package", type=Path, default=PACKAGE)
    parser.add_argument("--curve", type=Path, default=CURVE)
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--steps", type=int, default=20, help="inference steps for evaluate / grid")
    args = parser.parse_args(argv)
    for name in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "threads", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    return args


def _save_checkpoint(pipe, folder: Path) -> None:
    """`save_pretrained` into a sibling temp folder, then swap it in (the old folder is removed last)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
    from digits import data, models
    from digits.curve import write_curve
    from digits.train import encode, train_unet, train_vae

    from diffrt.export import export_pipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    (ink, labels), _ = data.load_split()
    images = torch.from_numpy(data.to_images(ink))
    gen = torch.Generator().manual_seed(args.seed)
    work = args.checkpoint.with_name(f".{args.checkpoint.name}.work")
    tokenizer = models.make_tokenizer(work)
    text_encoder, vae, unet = models.make_text_encoder(tokenizer), models.make_vae(), models.make_unet()

    vae_losses = train_vae(vae, images, args.vae_steps, args.vae_batch, 2e-3, gen)
    mean, std = encode(vae, images)
    scaling = float(1.0 / mean.std())  # unit-variance latents, as SD's 0.18215 was chosen
    vae.register_to_config(scaling_factor=scaling)
    logger.info("VAE done (%.0f s); latent scaling_factor %.4f", time.perf_counter() - start, scaling)

    def tokenize(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    noise = DDPMScheduler(**models.NOISE_SCHEDULE)
    unet_losses, ema_unet, ema_text = train_unet(
        unet, text_encoder, tokenize, noise, (mean * scaling, std * scaling), labels, data.stroke_words(ink),
        steps=args.unet_steps, batch=args.unet_batch, lr=2e-3, seed=args.seed + 1)
    logger.info("UNet done (%.0f s)", time.perf_counter() - start)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text.shadow, tokenizer=tokenizer, unet=ema_unet.shadow,
        scheduler=EulerDiscreteScheduler(**models.EULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    _save_checkpoint(pipe, args.checkpoint)
    shutil.rmtree(work, ignore_errors=True)
    write_curve(args.curve, {"VAE (MSE + KL)": vae_losses, "UNet (Min-SNR eps MSE)": unet_losses})
    export_pipeline(args.checkpoint, args.package, overwrite=True)
    logger.info("trained and exported in %.0f s (%s losses: vae %.4f, unet %.4f)", time.perf_counter() - start,
                "final 50-step mean", np.mean(vae_losses[-50:]), np.mean(unet_losses[-50:]))


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    from digits import quality

    from diffrt.runtime import DiffusionPipeline
    from diffrt.schedulers import ays_schedule

    pipe = DiffusionPipeline.from_pretrained(args.package, threads=1)
    pipe.set_progress_bar_config(disable=True)
    oracle = quality.fit_oracle()
    scores = {f"default scheduler, {args.steps} steps": quality.accuracy(
        oracle, quality.generate(pipe, num_inference_steps=args.steps))}
    sigmas = [float(s) for s in ays_schedule("StableDiffusion", 10).sigmas]
    scores["AYS sigmas, 10 steps"] = quality.accuracy(oracle, quality.generate(pipe, sigmas=sigmas))
    for name, value in scores.items():
        logger.info("oracle accuracy, %s: %.3f", name, value)
    return scores


def grid(args: argparse.Namespace) -> None:
    from digits import quality
    from PIL import Image

    from diffrt.runtime import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.package, threads=1)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(quality.grid(quality.generate(pipe, num_inference_steps=args.steps)))
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.grid.with_name(f".{args.grid.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, args.grid)
    logger.info("wrote %s", args.grid)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parse(argv)
    {"train": train, "evaluate": evaluate, "grid": grid}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
