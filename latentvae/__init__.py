"""latentvae: Stable-Diffusion-style image autoencoders that drop into diffusers pipelines.

The public names below are imported on first use (PEP 562, as diffusers and transformers do), so that
`import latentvae.cli` and `latentvae --help` do not load torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "AutoencoderKL": "latentvae.models.autoencoder_kl",
    "AutoencoderKLFlux2": "latentvae.models.autoencoder_kl_flux2",
    "VQModel": "latentvae.models.vq_model",
    "DiagonalGaussianDistribution": "latentvae.models.distributions",
    "VectorQuantizer": "latentvae.models.quantizer",
    "PRESETS": "latentvae.models.presets",
    "FLUX2_PRESETS": "latentvae.models.presets",
    "VQ_PRESETS": "latentvae.models.presets",
    "Fp16Report": "latentvae.models.inference",
    "check_fp16": "latentvae.models.inference",
    "optimize_for_inference": "latentvae.models.inference",
    "export_vae": "latentvae.files.export",
    "CardInfo": "latentvae.files.card",
    "load_vae": "latentvae.files.loading",
    "PickleRefusedError": "latentvae.files.loading",
    "StateDictMismatchError": "latentvae.files.loading",
    "VAEFileError": "latentvae.files.loading",
}
__all__ = [
    "FLUX2_PRESETS",
    "PRESETS",
    "VQ_PRESETS",
    "AutoencoderKL",
    "AutoencoderKLFlux2",
    "CardInfo",
    "DiagonalGaussianDistribution",
    "Fp16Report",
    "PickleRefusedError",
    "StateDictMismatchError",
    "VAEFileError",
    "VQModel",
    "VectorQuantizer",
    "check_fp16",
    "export_vae",
    "load_vae",
    "optimize_for_inference",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from latentvae.files.card import CardInfo
    from latentvae.files.export import export_vae
    from latentvae.files.loading import PickleRefusedError, StateDictMismatchError, VAEFileError, load_vae
    from latentvae.models.autoencoder_kl import AutoencoderKL
    from latentvae.models.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from latentvae.models.distributions import DiagonalGaussianDistribution
    from latentvae.models.inference import Fp16Report, check_fp16, optimize_for_inference
    from latentvae.models.presets import FLUX2_PRESETS, PRESETS, VQ_PRESETS
    from latentvae.models.quantizer import VectorQuantizer
    from latentvae.models.vq_model import VQModel


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'latentvae' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
