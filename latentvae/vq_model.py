"""The module path of `VQModel` in latentvae 0.1, kept for one reason: a pipeline saved with our VQModel names this module
in its model_index.json, and diffusers imports it (and finds ModelMixin in it) to load that pipeline. New code
imports `latentvae.VQModel` (defined in `latentvae.models.vq_model`)."""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks it up here)

from latentvae.models.vq_model import VQModel  # noqa: F401
