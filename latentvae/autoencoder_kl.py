"""The module path of `AutoencoderKL` in latentvae 0.1, kept for one reason: a pipeline saved with our AutoencoderKL names this module
in its model_index.json, and diffusers imports it (and finds ModelMixin in it) to load that pipeline. New code
imports `latentvae.AutoencoderKL` (defined in `latentvae.models.autoencoder_kl`)."""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)

from latentvae.models.autoencoder_kl import AutoencoderKL  # noqa: F401
