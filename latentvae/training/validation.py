"""Validation during training: reconstruct held-out images, score them, and draw input | reconstruction | error."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from latentvae.evaluation.metrics import psnr, ssim, to_uint8


@torch.no_grad()
def validate(
    vae: nn.Module, batches: Iterable[Tensor], perceptual: nn.Module | None = None, grid_images: int = 8
) -> tuple[dict[str, float], Tensor]:
    """Reconstruct through the posterior mode; mean PSNR / SSIM on uint8 (and LPIPS if a module is given).

    Args:
        vae: an autoencoder with diffusers' `forward(x).sample` interface.
        batches: image tensors in [-1, 1].
        perceptual: an LPIPS module (the training one) or None.
        grid_images: how many images the returned grid shows.

    Returns:
        `({"psnr", "ssim"[, "lpips"], "num_images"}, grid)`, the grid a (3, H', W') tensor in [0, 1] with one row
        per image: input | reconstruction | absolute error (x4, so small errors show).
    """
    was_training = vae.training
    vae.eval()
    scores: dict[str, list[Tensor]] = {"psnr": [], "ssim": []}
    rows: list[Tensor] = []
    for images in batches:
        images = images.to(vae.device, vae.dtype)
        recon = vae(images).sample.float().clamp(-1, 1)
        images = images.float()
        real8, fake8 = to_uint8(images), to_uint8(recon)
        scores["psnr"].append(psnr(real8, fake8))
        scores["ssim"].append(ssim(real8, fake8))
        if perceptual is not None:
            scores.setdefault("lpips", []).append(perceptual(images, recon).flatten().float())
        for real, fake in zip(images, recon):
            if len(rows) < grid_images * 3:
                error = ((real - fake).abs() * 4).clamp(0, 2) - 1  # shown on the same [-1, 1] scale
                rows.extend([real, fake, error])
    vae.train(was_training)
    if not scores["psnr"]:
        raise ValueError("no validation images")
    values = {name: torch.cat(parts) for name, parts in scores.items()}
    metrics = {name: finite_mean(v) for name, v in values.items()}
    metrics["num_images"] = len(values["psnr"])
    grid = make_grid(torch.stack(rows).cpu(), nrow=3, padding=2, normalize=True, value_range=(-1, 1))
    return metrics, grid


def finite_mean(values: Tensor) -> float:
    """Mean over finite values (a perfectly reconstructed image has infinite PSNR); inf if all are infinite."""
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if len(finite) else float("inf")


def save_grid(grid: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
