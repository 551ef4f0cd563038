"""latentvae: Stable-Diffusion-style image autoencoders that drop into diffusers pipelines."""

from latentvae.autoencoder_kl import AutoencoderKL
from latentvae.distributions import DiagonalGaussianDistribution
from latentvae.presets import PRESETS

__all__ = ["AutoencoderKL", "DiagonalGaussianDistribution", "PRESETS"]
__version__ = "0.1.0"
