"""Is a latent space healthy? Per-channel KL, active units, posterior noise and power spectra of a VAE's latents.

- Normalised units: what a diffusion model sees, the config's normalisation applied to the unscaled latent z:
  `(z - shift_factor) * scaling_factor` (SD, FLUX.1, SD3), `(z - latents_mean) * scaling_factor / latents_std`
  (pipelines that read them), or for a FLUX.2 VAE the `bn` running statistics of each channel of its 2x2 patches.
- Per-channel KL to N(0, I) of the posterior as the model was trained on it (unscaled), in nats, averaged over
  images and latent positions: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2).
- Active units (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders"): a channel is active when
  Var_x(E_q(z|x)[z]), the variance over images of its posterior mean in normalised units, exceeds 0.01. A latent
  position of a channel is one unit; the channel's value is the mean over its positions.
- Posterior noise: per channel, the mean posterior std against the spread (std over images and positions) of the
  posterior means, both normalised: their ratio says how much of a sampled latent is noise.
- Radially averaged power spectrum (mean removed per map), frequencies in cycles per sample (Nyquist 0.5), and the
  share of the power above half the Nyquist frequency (radius > 0.25), which is harder for diffusion models to learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016


# ----- normalisation: unscaled latents <-> what the diffusion model sees -----


def _affine(model: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with normalised = a * z + b elementwise, broadcastable to `like` (B, C, h, w)."""
    config = model.config
    if "bn" in dict(model.named_children()):  # a FLUX.2 VAE: BN statistics per channel of each p x p patch
        p = config.patch_size[0]
        channels, height, width = like.shape[1:]
        mean = model.bn.running_mean.view(channels, p, p).repeat(1, height // p, width // p)
        std = (
            (model.bn.running_var + model.bn.eps)
            .sqrt()
            .view(channels, p, p)
            .repeat(1, height // p, width // p)
        )
        return (1 / std).to(like), (-mean / std).to(like)
    scale = getattr(config, "scaling_factor", None) or 1.0
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return scale / std, -mean * scale / std
    shift = getattr(config, "shift_factor", None) or 0.0
    return torch.tensor(scale, dtype=like.dtype, device=like.device), torch.tensor(
        -shift * scale, dtype=like.dtype, device=like.device
    )


def normalise_latents(model: nn.Module, z: Tensor) -> Tensor:
    """Unscaled latents `(B, C, h, w)` -> normalised ones, as the model's target pipeline computes them."""
    a, b = _affine(model, z)
    return a * z + b


def denormalise_latents(model: nn.Module, z: Tensor) -> Tensor:
    """The inverse of `normalise_latents`: what `decode` takes."""
    a, b = _affine(model, z)
    return (z - b) / a


def normalised_std(model: nn.Module, std: Tensor) -> Tensor:
    """A posterior std in normalised units (the normalisation is affine, so only its scale acts on a std)."""
    a, _ = _affine(model, std)
    return a.abs() * std


# ----- per-channel KL, active units, posterior noise -----


def channel_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per image and channel, averaged over positions: `(B, C)` in nats."""
    per_element = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # 0.5 (mu^2 + s^2 - 1 - log s^2)
    return per_element.double().mean((2, 3))


@dataclass
class LatentHealth:
    """Accumulates posterior statistics over batches (`add`), then `summary()`; sums in float64."""

    images: int = 0
    kl_sum: Tensor | None = None  # (C,) sum over images of the per-image mean over positions
    mean_sum: Tensor | None = None  # (C, h, w) sums over images of the normalised posterior mean ...
    mean_square_sum: Tensor | None = None  # ... and of its square
    std_sum: Tensor | None = None  # (C,) sum over images of the mean normalised posterior std
    shape: tuple[int, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def add(self, model: nn.Module, mean: Tensor, logvar: Tensor | None) -> None:
        """One batch's posterior: unscaled `mean` and `logvar` `(B, C, h, w)`; `logvar` None for a VQ model (its
        encoder output is `mean`, and it has no KL or posterior noise)."""
        if self.shape is not None and tuple(mean.shape[1:]) != self.shape:
            raise ValueError(
                f"active units need latents of one shape, got {tuple(mean.shape[1:])} after {self.shape}: "
                "give images of one size (a fixed resolution)"
            )
        self.shape = tuple(mean.shape[1:])
        normalised = normalise_latents(model, mean).double()
        self.images += mean.shape[0]
        self.mean_sum = _plus(self.mean_sum, normalised.sum(0))
        self.mean_square_sum = _plus(self.mean_square_sum, normalised.square().sum(0))
        if logvar is not None:
            self.kl_sum = _plus(self.kl_sum, channel_kl(mean, logvar).sum(0))
            std = normalised_std(model, (0.5 * logvar).exp()).double()
            self.std_sum = _plus(self.std_sum, std.mean((2, 3)).sum(0))

    def mean_variance(self) -> Tensor:
        """Per channel: Var over images of the normalised posterior mean, averaged over positions `(C,)`."""
        mean = self.mean_sum / self.images
        return (self.mean_square_sum / self.images - mean.square()).clamp_min(0).mean((1, 2))

    def summary(self) -> dict[str, Any]:
        if self.images == 0:
            raise ValueError("no latents to measure the latent health on")
        variance = self.mean_variance()
        # spread of the means over images and positions: E[m^2] - E[m]^2 over both
        moment = self.mean_square_sum.mean((1, 2)) / self.images
        spread = (moment - (self.mean_sum.mean((1, 2)) / self.images).square()).clamp_min(0).sqrt()
        out: dict[str, Any] = {
            "images": self.images,
            "channels": self.shape[0],
            "active_units": int((variance > ACTIVE_THRESHOLD).sum()),
            "mean_variance_per_channel": variance.tolist(),
            "mean_spread_per_channel": spread.tolist(),
            "kl_per_channel": None,
            "kl_mean": None,
            "posterior_std_per_channel": None,
            "noise_to_spread_per_channel": None,
        }
        if self.kl_sum is not None:
            kl = self.kl_sum / self.images
            std = self.std_sum / self.images
            out.update(
                kl_per_channel=kl.tolist(),
                kl_mean=kl.mean().item(),
                posterior_std_per_channel=std.tolist(),
                noise_to_spread_per_channel=(std / spread).tolist(),
            )
        return out


def _plus(total: Tensor | None, value: Tensor) -> Tensor:
    return value.cpu() if total is None else total + value.cpu()


def posterior_parts(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(mean, logvar) of a KL model's posterior q(z|x), unscaled; (encoder output, None) for a VQ model."""
    encoded = model.encode(x)
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.mean, encoded.latent_dist.logvar
    return encoded.latents, None


@torch.no_grad()
def latent_health_scalars(model: nn.Module, batches: Any) -> dict[str, float]:
    """Per-channel KL (`kl/channel_i`, KL models only) and `active_units` of images in [-1, 1], for a tracker."""
    was_training = model.training
    model.eval()
    health = LatentHealth()
    for images in batches:
        health.add(model, *posterior_parts(model, images.to(model.device, model.dtype)))
    model.train(was_training)
    summary = health.summary()
    scalars = {"active_units": float(summary["active_units"])}
    for i, value in enumerate(summary["kl_per_channel"] or []):
        scalars[f"kl/channel_{i}"] = value
    return scalars


# ----- power spectra -----


def _radius_bins(height: int, width: int) -> tuple[np.ndarray, int]:
    """Integer radius bin of every FFT frequency (cycles per sample times n = min side), and n."""
    n = min(height, width)
    fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
    return np.rint(np.sqrt(fy**2 + fx**2) * n).astype(np.int64), n


def power_maps(x: Tensor) -> np.ndarray:
    """|FFT|^2 / (h w) of every map of `(..., h, w)`, each with its mean removed (so the DC term is 0)."""
    maps = x.detach().double().cpu().flatten(0, -3).numpy()
    maps = maps - maps.mean((-2, -1), keepdims=True)
    return np.abs(np.fft.fft2(maps)) ** 2 / (maps.shape[-2] * maps.shape[-1])


@dataclass
class Spectrum:
    """Radially averaged power spectrum of maps `(..., h, w)` accumulated over batches (`add`)."""

    power_sum: np.ndarray | None = None  # per radius bin, summed over maps
    high_sum: float = 0.0  # power above half the Nyquist frequency, summed over maps
    total_sum: float = 0.0
    maps: int = 0
    bins: np.ndarray | None = None
    n: int = 0

    def add(self, x: Tensor) -> None:
        power = power_maps(x)
        if self.bins is None:
            self.bins, self.n = _radius_bins(*power.shape[-2:])
        elif self.bins.shape != power.shape[-2:]:
            raise ValueError(f"spectra of maps of one size only: {power.shape[-2:]} after {self.bins.shape}")
        counts = np.bincount(self.bins.ravel())
        per_bin = np.stack([np.bincount(self.bins.ravel(), p.ravel(), len(counts)) for p in power]) / counts
        self.power_sum = per_bin.sum(0) if self.power_sum is None else self.power_sum + per_bin.sum(0)
        self.high_sum += float(power[..., self.bins > self.n / 4].sum())  # radius > 0.25 cycles/sample
        self.total_sum += float(power.sum())
        self.maps += len(power)

    def summary(self) -> dict[str, Any]:
        """`frequency` (cycles per sample, 1/n .. 1/2), `power` (mean per map), `high_frequency_share`."""
        last = self.n // 2  # the Nyquist bin; bins beyond it are the corners of the square of frequencies
        power = self.power_sum[1 : last + 1] / self.maps
        return {
            "frequency": (np.arange(1, last + 1) / self.n).tolist(),
            "power": power.tolist(),
            "high_frequency_share": self.high_sum / self.total_sum if self.total_sum > 0 else None,
        }
