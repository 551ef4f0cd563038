"""latentvae: Stable-Diffusion-style image autoencoders that drop into diffusers pipelines."""

from latentvae.autoencoder_kl import AutoencoderKL
from latentvae.distributions import DiagonalGaussianDistribution
from latentvae.export import export_vae
from latentvae.loading import PickleRefusedError, StateDictMismatchError, VAEFileError, load_vae
from latentvae.presets import PRESETS

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussianDistribution",
    "PRESETS",
    "PickleRefusedError",
    "StateDictMismatchError",
    "VAEFileError",
    "export_vae",
    "load_vae",
]
__version__ = "0.1.0"
