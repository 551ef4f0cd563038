"""Named model shapes: constructor arguments for `AutoencoderKL` (`PRESETS`) and `VQModel` (`VQ_PRESETS`), offered by
their `from_preset` and the training script."""

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


def _vq_preset(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    latent_channels: int,
    num_vq_embeddings: int,
    norm_num_groups: int = 32,
    sample_size: int = 256,
    scaling_factor: float = 1.0,
) -> dict[str, Any]:
    kl = _kl_preset(
        block_out_channels, layers_per_block, latent_channels, norm_num_groups, sample_size, scaling_factor
    )
    return {**kl, "num_vq_embeddings": num_vq_embeddings, "vq_embed_dim": latent_channels}


# Constructor arguments for `VQModel` (offered by `VQModel.from_preset` and `train.py --model vq`). LDM trained its
# diffusion models on VQ latents unscaled (scale_factor 1.0); training measures and records the actual one.
VQ_PRESETS: dict[str, dict[str, Any]] = {
    # LDM's vq-f4 first stage (CompVis ldm-celebahq-256 / ldm-super-resolution vqvae): 3 levels of 128, 256, 512,
    # 2 resnets per level, a 3-channel latent, 8192 codes of dimension 3.
    "vq-f4": _vq_preset((128, 256, 512), 2, 3, 8192),
    # For the CPU quickstart and tests: f4, 3 channels, 512 codes, about 1 M parameters.
    "tiny-vq-f4": _vq_preset((32, 64, 64), 1, 3, 512, norm_num_groups=16),
}
