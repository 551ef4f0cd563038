"""The preview decoder's model: a TAESD-shaped `diffusers.AutoencoderTiny` for one VAE's latent space, and the
latent convention it works in.

Pipelines normalise a VAE's latent z for diffusion and undo it before decoding; the preview decoder works on the
normalised latent z_n, as TAESD does for SD and SDXL (its config: `scaling_factor` 1.0, `shift_factor` 0):

    full VAE:    z_n = (z - shift_factor) * scaling_factor        image = vae.decode(z_n / scaling_factor + shift_factor)
                 (SDXL-style pipelines, when the VAE has latents_mean / latents_std: z_n = (z - mean) * sf / std)
    preview:     image = tiny.decode(z_n / 1.0 + 0.0)              tiny.encode(image) ~ z_n  (img2img multiplies by 1.0)

so in any diffusers pipeline `pipe.vae = tiny` decodes the latents the diffusion model made (an `AutoencoderTiny`
config has no latents_mean, so SDXL-style pipelines take the plain path too). `latent_magnitude` m and
`latent_shift` s are for the byte form of the latent (`AutoencoderTiny.scale_latents`: z_n / (2 m) + s, clamped
to [0, 1]; `forward` round-trips through it): m = 3 std and s = 0.5 - mean / (2 m) of z_n measured on data, so that
+-3 standard deviations around the mean fill [0, 1] (TAESD's constants, 3 and 0.5, for a zero-mean, unit-std z_n).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import AutoencoderTiny
from torch import Tensor

# TAESD's width: 64 channels at every level.
TAESD_CHANNELS = 64


def check_teacher(vae: Any, where: str) -> None:
    """A preview decoder is distilled from a Gaussian (KL) VAE with a plain latent: refuse the others, by name."""
    name = type(vae).__name__
    if name != "AutoencoderKL":
        raise ValueError(
            f"{where} holds a {name}: the preview decoder is distilled from an AutoencoderKL (ours or diffusers'); "
            "a VQModel's codebook latent and AutoencoderKLFlux2's patchified, BatchNorm-normalised latent are not "
            "supported"
        )


def _per_channel(values: Any, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def normalise_latents(vae_config: Any, z: Tensor) -> Tensor:
    """The pipelines' normalised latent z_n of the VAE's raw latent `z` (module docstring)."""
    scale = vae_config.scaling_factor
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        return (z - _per_channel(mean, z)) * scale / _per_channel(std, z)
    return (z - (vae_config.get("shift_factor") or 0.0)) * scale


def raw_latents(vae_config: Any, z_n: Tensor) -> Tensor:
    """The inverse of `normalise_latents`: the latent the VAE's decoder reads."""
    scale = vae_config.scaling_factor
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        return z_n * _per_channel(std, z_n) / scale + _per_channel(mean, z_n)
    return z_n / scale + (vae_config.get("shift_factor") or 0.0)


def parse_channels(text: str, levels: int) -> tuple[int, ...]:
    """`--preview_channels`: the width of every level ("64"; TAESD's). diffusers' `AutoencoderTiny` runs one width
    through all levels (the conv between two levels keeps its width), so "64,32,..." is refused unless all equal."""
    try:
        widths = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"--preview_channels takes one integer width, got {text!r}") from None
    if len(set(widths)) != 1 or widths[0] < 1:
        raise ValueError(
            f"--preview_channels: one positive width for all levels (diffusers' AutoencoderTiny keeps one width "
            f"from level to level), got {text!r}"
        )
    return widths[:1] * levels


def preview_config(vae: Any, channels: str | int = TAESD_CHANNELS) -> dict[str, Any]:
    """The `AutoencoderTiny` constructor arguments for `vae`'s latent space: TAESD's blocks ((1, 3, 3, 3) in the
    encoder, (3, 3, 3, 1) in the decoder at f8), as many levels as the VAE has (so the pipelines' vae_scale_factor,
    2 ** (len(block_out_channels) - 1), is the VAE's), its latent and image channels, and the normalised-latent
    convention (scaling_factor 1, shift_factor 0).

    Args:
        vae: the teacher, an `AutoencoderKL`.
        channels: `--preview_channels`, the width of every level.
    """
    config = vae.config
    levels = len(config.block_out_channels)
    widths = parse_channels(str(channels), levels)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "encoder_block_out_channels": widths,
        "decoder_block_out_channels": widths[::-1],
        "num_encoder_blocks": (1,) + (3,) * (levels - 1),
        "num_decoder_blocks": (3,) * (levels - 1) + (1,),
        "latent_magnitude": 3.0,
        "latent_shift": 0.5,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
    }


def build_preview(vae: Any, channels: str | int = TAESD_CHANNELS) -> AutoencoderTiny:
    """A randomly initialised `AutoencoderTiny` for `vae`'s latent space (`preview_config`), fp32."""
    return AutoencoderTiny(**preview_config(vae, channels)).float()


def set_latent_range(preview: AutoencoderTiny, mean: float, std: float) -> tuple[float, float]:
    """Set `latent_magnitude` = 3 std and `latent_shift` = 0.5 - mean / (2 m) from the normalised latent's `mean`
    and `std` (config and attributes, which `scale_latents` reads); returns (m, s)."""
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"latent statistics must be finite with std > 0, got mean {mean}, std {std}")
    magnitude = 3.0 * std
    shift = 0.5 - mean / (2 * magnitude)
    preview.register_to_config(latent_magnitude=magnitude, latent_shift=shift)
    preview.latent_magnitude, preview.latent_shift = magnitude, shift
    return magnitude, shift


def last_layer(preview: AutoencoderTiny) -> Tensor:
    """The decoder's last convolution's weight (for the GAN's adaptive weight)."""
    return preview.decoder.layers[-1].weight
