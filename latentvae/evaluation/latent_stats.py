"""The statistics of a VAE's latents over a set of images, from which every latent normalisation is computed
(`latentvae.evaluation.normalization`): pipelines normalise latents so the diffusion model sees zero mean and unit
variance.

One pass keeps exact float64 sums (count, sum, sum of squares) per latent channel and per channel of the 2x2-patchified
latents (the 4C channels FLUX.2 pipelines normalise with their BatchNorm statistics); sums from several processes add
up to the statistics of the whole set (`reduce`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LatentStats:
    """Statistics of posterior samples z ~ q(z|x) (or the posterior mode; a VQ model: encoder outputs before
    quantisation) over images. Variances are population variances (sum of squares / count - mean^2)."""

    num_images: int
    std: float  # over all latent elements
    mean: float
    channel_mean: list[float]
    channel_std: list[float]
    # Over 2x2-patchified latents (B, 4C, h/2, w/2), channel 4c + 2i + j as diffusers' FLUX.2 pipelines patchify;
    # None when a latent had an odd height or width.
    patch_mean: list[float] | None = None
    patch_var: list[float] | None = None
    posterior: str = "sample"  # which latents were measured: "sample", "mode" or (VQ) "encoder output"

    @property
    def scaling_factor(self) -> float:
        """1 / std of the latents (LDM section 4.3.2): scaled latents have unit variance."""
        return 1.0 / self.std


def patchify(z: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2): each 2x2 block of latent positions becomes 4 channels (4c + 2i + j).

    The reshape of diffusers' `Flux2Pipeline._patchify_latents` (a test checks they agree), written out here because
    importing the pipeline module imports transformers."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"patchify needs latents of even height and width; got {h}x{w}")
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, h/2, w/2)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z: Tensor) -> Tensor:
    """The inverse of `patchify`: (B, 4C, h/2, w/2) -> (B, C, h, w)."""
    b, c4, h, w = z.shape
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, h/2, 2, w/2, 2)
    return z.reshape(b, c4 // 4, h * 2, w * 2)


def latent_channels(vae: torch.nn.Module) -> int:
    """Channels of what `encode` returns: a VQ model's `vq_embed_dim` when set, else `latent_channels`."""
    return vae.config.get("vq_embed_dim") or vae.config.latent_channels


def _channel_sums(z: Tensor) -> tuple[Tensor, Tensor]:
    per_channel = z.transpose(0, 1).flatten(1)  # (C, B*H*W)
    return per_channel.sum(1), per_channel.square().sum(1)


@torch.no_grad()
def measure_latent_stats(
    vae: torch.nn.Module,
    batches: Iterable[Tensor],
    generator: torch.Generator | None = None,
    sample_posterior: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> LatentStats:
    """Encode `batches` of images in [-1, 1] and accumulate the latents' statistics (float64 sums, exact).

    Args:
        vae: an AutoencoderKL, AutoencoderKLFlux2 or VQModel (ours or diffusers').
        batches: image tensors (B, 3, H, W) in [-1, 1].
        generator: RNG for the posterior samples.
        sample_posterior: measure posterior samples (True) or the posterior mode (False); a VQ model has one
            latent, its encoder output.
        reduce: sums a float64 tensor over processes (e.g. `lambda t: accelerator.reduce(t, "sum")`) when each
            process measured its own share of the images; every process then gets the statistics of the whole set.
    """
    c = latent_channels(vae)
    # [images, elements per channel, batches with odd latent sides], sum, sum of squares, and the same per patch channel
    head = torch.zeros(3, dtype=torch.float64)
    total, total_sq = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    patch_total, patch_sq = torch.zeros(4 * c, dtype=torch.float64), torch.zeros(4 * c, dtype=torch.float64)
    for images in batches:
        images = images.to(device=vae.device, dtype=vae.dtype)
        encoded = vae.encode(images)
        # KL: a posterior sample; VQ: the latents before quantisation, which LDM's diffusion models are trained on.
        if hasattr(encoded, "latent_dist"):
            posterior = encoded.latent_dist
            z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        else:
            z = encoded.latents
        z = z.double().cpu()
        sums, squares = _channel_sums(z)
        total += sums
        total_sq += squares
        head[0] += images.shape[0]
        head[1] += z.shape[0] * z.shape[2] * z.shape[3]
        if z.shape[2] % 2 or z.shape[3] % 2:
            head[2] += 1
        else:
            sums, squares = _channel_sums(patchify(z))
            patch_total += sums
            patch_sq += squares
    if reduce is not None:
        packed = torch.cat([head, total, total_sq, patch_total, patch_sq])
        packed = reduce(packed.to(vae.device)).cpu()
        head, total, total_sq, patch_total, patch_sq = packed.split([3, c, c, 4 * c, 4 * c])
    num_images, count, odd = (int(v) for v in head.tolist())
    if num_images == 0:
        raise ValueError("no images to measure the latent statistics on")
    channel_mean = total / count
    channel_var = total_sq / count - channel_mean.square()
    mean = channel_mean.mean()  # every channel has `count` elements
    var = total_sq.sum() / (count * c) - mean.square()
    patch_mean = patch_var = None
    if not odd:
        patch_count = count / 4
        patch_mean = patch_total / patch_count
        patch_var = (patch_sq / patch_count - patch_mean.square()).clamp_min(0).tolist()
        patch_mean = patch_mean.tolist()
    return LatentStats(
        num_images=num_images,
        std=var.clamp_min(0).sqrt().item(),
        mean=mean.item(),
        channel_mean=channel_mean.tolist(),
        channel_std=channel_var.clamp_min(0).sqrt().tolist(),
        patch_mean=patch_mean,
        patch_var=patch_var,
        posterior="encoder output" if hasattr(vae, "quantize") else "sample" if sample_posterior else "mode",
    )
