"""Named model shapes: constructor arguments for `AutoencoderKL`, offered by `from_preset` and the CLI."""

from __future__ import annotations

from typing import Any


def _kl_preset(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    latent_channels: int,
    norm_num_groups: int = 32,
    sample_size: int = 256,
    scaling_factor: float = 0.18215,
) -> dict[str, Any]:
    levels = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # The SD 1.x / 2.x VAE (CompVis kl-f8): 34.2 M encoder + 49.5 M decoder parameters.
    "sd-kl-f8": _kl_preset((128, 256, 512, 512), 2, 4, sample_size=512, scaling_factor=0.18215),
    # Same shape; SDXL's VAE was retrained with a different latent scale.
    "sdxl-kl-f8": _kl_preset((128, 256, 512, 512), 2, 4, sample_size=1024, scaling_factor=0.13025),
    # LDM's kl-f4 shape (3 levels, 3 latent channels): 4x less spatial compression.
    "kl-f4": _kl_preset((128, 256, 512), 2, 3),
    # A quarter of the SD width: f8, 4 channels, trains usefully on one GPU.
    "small-kl-f8": _kl_preset((64, 128, 256, 256), 2, 4),
    # For the CPU quickstart and tests: f8, 4 channels, about 1 M parameters.
    "tiny-kl-f8": _kl_preset((32, 64, 64, 64), 1, 4, norm_num_groups=16),
}
