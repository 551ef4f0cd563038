"""Validation during training: reconstruct held-out images, score them (PSNR, SSIM, and the colour scores that PSNR
hides), and draw whole, colourful validation images as input | reconstruction | error, large enough to judge."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from latentvae.data.images import BadImageError, ImageSource, load_rgb, to_tensor
from latentvae.evaluation.artefacts import equivariance
from latentvae.evaluation.colour import colour_scores, colourfulness
from latentvae.evaluation.latent_health import denormalise_latents
from latentvae.evaluation.metrics import psnr, ssim, to_uint8


@torch.no_grad()
def validate(
    vae: nn.Module, batches: Iterable[Tensor], perceptual: nn.Module | None = None
) -> dict[str, float]:
    """Reconstruct through the posterior mode; mean scores on uint8 (and LPIPS if a module is given).

    Args:
        vae: an autoencoder with diffusers' `forward(x).sample` interface.
        batches: image tensors in [-1, 1].
        perceptual: an LPIPS module (the training one) or None.

    Returns:
        `{"psnr", "ssim", "psnr_y", "psnr_c", "colourfulness_ratio", "ciede2000"[, "lpips"], "num_images"}`
        (`latentvae.evaluation.colour` defines the colour scores).
    """
    was_training = vae.training
    vae.eval()
    scores: dict[str, list[Tensor]] = {}
    for images in batches:
        images = images.to(vae.device, vae.dtype)
        recon = vae(images).sample.float().clamp(-1, 1)
        images = images.float()
        real8, fake8 = to_uint8(images), to_uint8(recon)
        batch = {"psnr": psnr(real8, fake8), "ssim": ssim(real8, fake8), **colour_scores(real8, fake8)}
        if perceptual is not None:
            batch["lpips"] = perceptual(images, recon).flatten().float()
        for name, values in batch.items():
            scores.setdefault(name, []).append(values.cpu())
    vae.train(was_training)
    if not scores:
        raise ValueError("no validation images")
    values = {name: torch.cat(parts) for name, parts in scores.items()}
    metrics = {name: finite_mean(v) for name, v in values.items()}
    metrics["num_images"] = len(values["psnr"])
    return metrics


@torch.no_grad()
def latent_space_metrics(
    vae: nn.Module, batches: Iterable[Tensor], anchor: nn.Module | None = None
) -> dict[str, float]:
    """The regularisers' view of the validation images: equivariance PSNR (`latentvae diagnose`'s: decode(T(z))
    against T(x), T = 2x / 4x downscale and a 90-degree turn) and, with `anchor` (the frozen starting model of a
    fine-tune), the latent drift: the mean squared difference of normalised posterior means per element, and the
    PSNR of decoding the starting model's latents with the current decoder (a diffusion model trained on the
    starting latents sees this decoder's output).

    Returns:
        `{"equivariance/<T>": dB, ...}` (+ `"latent_drift_mse"`, `"latent_drift_psnr"`), means over the images.
    """
    was_training = vae.training
    vae.eval()
    scores: dict[str, list[Tensor]] = {}
    for images in batches:
        images = images.to(vae.device, vae.dtype)
        for name, values in equivariance(vae, to_uint8(images.float()).to(vae.dtype)).items():
            if name != "none":
                scores.setdefault(f"equivariance/{name}", []).append(torch.tensor(values))
        if anchor is not None:
            start = anchor(images)  # normalised posterior means of the starting model
            mean = anchor.normalise(vae.encode(images).latent_dist.mean)
            scores.setdefault("latent_drift_mse", []).append((mean - start).pow(2).flatten(1).mean(1).cpu())
            decoded = vae.decode(denormalise_latents(anchor.start, start).to(vae.dtype)).sample.float()
            scores.setdefault("latent_drift_psnr", []).append(
                psnr(to_uint8(images.float()), to_uint8(decoded.clamp(-1, 1))).cpu()
            )
    vae.train(was_training)
    return {name: finite_mean(torch.cat(parts)) for name, parts in scores.items()}


def finite_mean(values: Tensor) -> float:
    """Mean over finite values (a perfectly reconstructed image has infinite PSNR); inf if all are infinite, NaN
    if none is (a colourfulness ratio of grey images only)."""
    finite = values[torch.isfinite(values)]
    if len(finite):
        return finite.mean().item()
    return float("inf") if bool((values == float("inf")).any()) else float("nan")


def grid_images(
    sources: Sequence[ImageSource], count: int = 4, size: int = 256, multiple: int = 8, candidates: int = 64
) -> list[Tensor]:
    """The `count` most colourful of the first `candidates` validation images (Hasler-Suesstrunk colourfulness of
    the original), whole: downscaled to fit `size` x `size`, sides cut to a multiple of `multiple` (the model's
    downsampling factor). Tensors `(3, h, w)` in [-1, 1]; unreadable files are left out."""
    images = []
    for source in list(sources)[:candidates]:
        try:
            image = load_rgb(source)
        except BadImageError:
            continue  # counted by the validation set's own loading
        scale = min(1.0, size / max(image.size))
        w, h = (max(multiple, int(side * scale) // multiple * multiple) for side in image.size)
        images.append(to_tensor(image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)))
    ranked = sorted(images, key=lambda x: -colourfulness(to_uint8(x)[None]).item())
    return ranked[:count]


@torch.no_grad()
def reconstruction_grid(vae: nn.Module, images: Sequence[Tensor], size: int = 256) -> Tensor:
    """One row per image: input | reconstruction (posterior mode) | absolute error x4, each padded to `size`
    square with mid grey; a (3, H', W') tensor in [0, 1]."""
    was_training = vae.training
    vae.eval()
    tiles = []
    for image in images:
        x = image[None].to(vae.device, vae.dtype)
        recon = vae(x).sample.float().clamp(-1, 1)[0].cpu()
        error = ((image - recon).abs() * 4).clamp(0, 2) - 1  # shown on the same [-1, 1] scale
        for tile in (image, recon, error):
            pad_w, pad_h = size - tile.shape[-1], size - tile.shape[-2]
            tiles.append(
                F.pad(tile, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
            )
    vae.train(was_training)
    return make_grid(
        torch.stack(tiles), nrow=3, padding=4, normalize=True, value_range=(-1, 1), pad_value=1.0
    )


def save_grid(grid: Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
