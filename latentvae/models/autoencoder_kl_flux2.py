"""The FLUX.2 VAE, as a drop-in for `diffusers.AutoencoderKLFlux2`: the `AutoencoderKL` body with 32 latent channels,
an optional decoder of other widths, and a BatchNorm over 2x2-patchified latents whose running statistics the FLUX.2
pipelines normalise with.

    pipeline, encode:  z (B, C, h, w) -> patchify (B, 4C, h/2, w/2) -> (z - bn.running_mean) / sqrt(bn.running_var + eps)
    pipeline, decode:  the inverse, then unpatchify

The model's own `encode` / `decode` / `forward` never call `bn` (neither do diffusers'): they map images to unscaled
latents and back, exactly as `AutoencoderKL` does, so training leaves the BN buffers as they are.
"""

from __future__ import annotations

import math

from diffusers.configuration_utils import register_to_config

# As in autoencoder_kl: a saved pipeline names this module, and diffusers looks up ModelMixin here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from torch import nn

from latentvae.models.autoencoder_kl import AutoencoderKL
from latentvae.models.base import DiffusersTwin
from latentvae.models.presets import FLUX2_PRESETS

_LEVELS = 4  # diffusers' default: the SD shape's four levels


class AutoencoderKLFlux2(AutoencoderKL):
    r"""The FLUX.2 VAE: images in [-1, 1] <-> unscaled 32-channel latents, plus the latent normalisation statistics.

    Constructor arguments, defaults, `state_dict()` keys (`bn.running_mean`, `bn.running_var`,
    `bn.num_batches_tracked` included) and outputs are those of `diffusers.AutoencoderKLFlux2`; encoding, decoding,
    tiling and slicing are `AutoencoderKL`'s.

    Args:
        in_channels / out_channels, down_block_types / up_block_types, block_out_channels, layers_per_block, act_fn,
        latent_channels, norm_num_groups, sample_size, use_quant_conv / use_post_quant_conv, mid_block_add_attention:
            as in `AutoencoderKL` (other defaults: the FLUX.2 VAE's shape).
        decoder_block_out_channels (`tuple[int]`, *optional*): the decoder's widths, one per level (default: the
            encoder's `block_out_channels`).
        batch_norm_eps (`float`): the BN epsilon, which pipelines add to `running_var`.
        batch_norm_momentum (`float`): the BN momentum (used only if `bn` is called in train mode).
        patch_size (`tuple[int, int]`): the patchification before `bn`, which has `prod(patch_size) * latent_channels`
            channels.
    """

    diffusers_class_name = "AutoencoderKLFlux2"
    presets = FLUX2_PRESETS

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * _LEVELS,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * _LEVELS,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        decoder_block_out_channels: tuple[int, ...] | None = None,
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 32,
        norm_num_groups: int = 32,
        sample_size: int | tuple[int, int] = 1024,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        batch_norm_eps: float = 1e-4,
        batch_norm_momentum: float = 0.1,
        patch_size: tuple[int, int] = (2, 2),
    ):
        # Not AutoencoderKL.__init__: its @register_to_config would add diffusers.AutoencoderKL's arguments
        # (scaling_factor, force_upcast, ...) to this config, which diffusers.AutoencoderKLFlux2 does not have.
        DiffusersTwin.__init__(self)
        self._build()
        # Normalisation statistics only (no affine weights): buffers that no gradient reaches.
        self.bn = nn.BatchNorm2d(
            math.prod(patch_size) * latent_channels,
            eps=batch_norm_eps,
            momentum=batch_norm_momentum,
            affine=False,
            track_running_stats=True,
        )
