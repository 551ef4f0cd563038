"""The latent scaling factor: pipelines multiply latents by it so the diffusion model sees unit variance."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LatentStats:
    """Statistics of posterior samples z ~ q(z|x) (a VQ model: encoder outputs before quantisation) over images."""

    num_images: int
    std: float  # over all latent elements
    mean: float
    channel_mean: list[float]
    channel_std: list[float]

    @property
    def scaling_factor(self) -> float:
        """1 / std of the latents (LDM section 4.3.2): scaled latents have unit variance."""
        return 1.0 / self.std


@torch.no_grad()
def measure_latent_stats(
    vae: torch.nn.Module, batches: Iterable[Tensor], generator: torch.Generator | None = None
) -> LatentStats:
    """Encode `batches` of images in [-1, 1], sample the posterior, and accumulate the latents' statistics.

    Sums are kept in float64 so a few hundred images of 64x64x4 latents lose no precision.

    Args:
        vae: an AutoencoderKL or VQModel (ours or diffusers').
        batches: image tensors (B, 3, H, W) in [-1, 1].
        generator: RNG for the posterior samples.
    """
    count = 0
    num_images = 0
    total = total_sq = None
    for images in batches:
        images = images.to(device=vae.device, dtype=vae.dtype)
        encoded = vae.encode(images)
        # KL: a posterior sample; VQ: the latents before quantisation, which LDM's diffusion models are trained on.
        if hasattr(encoded, "latent_dist"):
            z = encoded.latent_dist.sample(generator=generator).double()
        else:
            z = encoded.latents.double()
        per_channel = z.transpose(0, 1).flatten(1)  # (C, B*H*W)
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        total_sq = per_channel.square().sum(1) if total_sq is None else total_sq + per_channel.square().sum(1)
        count += per_channel.shape[1]
        num_images += images.shape[0]
    if num_images == 0:
        raise ValueError("no images to measure the latent scaling factor on")
    channel_mean = total / count
    channel_var = total_sq / count - channel_mean.square()
    mean = channel_mean.mean()
    var = (total_sq.sum() / (count * len(total))) - mean.square()
    return LatentStats(
        num_images=num_images,
        std=var.clamp_min(0).sqrt().item(),
        mean=mean.item(),
        channel_mean=channel_mean.tolist(),
        channel_std=channel_var.clamp_min(0).sqrt().tolist(),
    )
