"""latentvae: Stable-Diffusion-style image autoencoders that drop into diffusers pipelines."""

from latentvae.autoencoder_kl import AutoencoderKL
from latentvae.distributions import DiagonalGaussianDistribution
from latentvae.export import export_vae
from latentvae.inference import Fp16Report, check_fp16, optimize_for_inference
from latentvae.loading import PickleRefusedError, StateDictMismatchError, VAEFileError, load_vae
from latentvae.presets import PRESETS, VQ_PRESETS
from latentvae.quantizer import VectorQuantizer
from latentvae.vq_model import VQModel

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussianDistribution",
    "Fp16Report",
    "PRESETS",
    "PickleRefusedError",
    "StateDictMismatchError",
    "VAEFileError",
    "VQModel",
    "VQ_PRESETS",
    "VectorQuantizer",
    "check_fp16",
    "export_vae",
    "load_vae",
    "optimize_for_inference",
]
__version__ = "0.1.0"
