"""The diagonal Gaussian posterior q(z|x) = N(mu, diag(sigma^2)) that the KL autoencoder's encoder predicts."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussianDistribution:
    """A Gaussian with diagonal covariance, parameterised by the encoder output `[mean, logvar]` on dim 1.

    Same interface and numerics as `diffusers.models.autoencoders.vae.DiagonalGaussianDistribution`, so pipelines
    that call `latent_dist.sample(generator)` or `latent_dist.mode()` behave identically.

    Args:
        parameters (`Tensor`): shape `(B, 2C, H, W)`: the first C channels are the mean, the last C the log-variance.
        deterministic (`bool`): if True the distribution is a point mass at the mean (std = var = 0, KL = 0).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The clamp keeps exp() finite for untrained or diverging encoders (sigma in [3e-7, 2.2e4]).
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)  # sigma = exp(log sigma^2 / 2)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Draw z = mu + sigma * eps, eps ~ N(0, I) (the reparameterisation trick: gradients reach mu and logvar).

        Args:
            generator: a `torch.Generator` (or one per batch element, as diffusers accepts) for reproducible eps.
        """
        eps = _standard_normal(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """Closed-form KL(self || other), summed over C, H, W; `other=None` means N(0, I).

        KL(N(mu, s^2) || N(0, 1)) = 0.5 * (mu^2 + s^2 - 1 - log s^2), per dimension.
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            per_dim = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            # KL(N(m1, s1^2) || N(m2, s2^2)) = 0.5 * ((m1 - m2)^2 / s2^2 + s1^2 / s2^2 - 1 - log s1^2 + log s2^2)
            per_dim = (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
            per_dim = per_dim - self.logvar + other.logvar
        return 0.5 * per_dim.sum(dim=[1, 2, 3])

    def nll(self, sample: Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of `sample` under this Gaussian, summed over `dims`.

        -log N(x; mu, s^2) = 0.5 * (log 2pi + log s^2 + (x - mu)^2 / s^2), per dimension.
        """
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        per_dim = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * per_dim.sum(dim=list(dims))


def _standard_normal(
    shape: torch.Size,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """N(0, I) noise drawn exactly as `diffusers.utils.torch_utils.randn_tensor` draws it, so seeds agree.

    A generator on another device (typically a CPU generator for a CUDA model) draws on its own device and the
    noise is moved; a list of generators draws one batch element each.
    """
    if isinstance(generator, list):
        return torch.cat([_standard_normal((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    if draw_device.type != device.type and draw_device.type != "cpu":
        raise ValueError(
            f"generator is on {draw_device} but the latents are on {device}; use a CPU generator"
        )
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
