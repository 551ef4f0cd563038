"""Named model shapes: constructor arguments for `AutoencoderKL` (`PRESETS`), `AutoencoderKLFlux2` (`FLUX2_PRESETS`)
and `VQModel` (`VQ_PRESETS`), offered by their `from_preset` and the training script."""

from __future__ import annotations

from typing import Any


def _kl_preset(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    latent_channels: int,
    norm_num_groups: int = 32,
    sample_size: int = 256,
    scaling_factor: float = 0.18215,
    **extra: Any,
) -> dict[str, Any]:
    return {
        **_body(block_out_channels, layers_per_block, latent_channels, norm_num_groups, sample_size),
        "scaling_factor": scaling_factor,
        **extra,
    }


def _body(
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    latent_channels: int,
    norm_num_groups: int,
    sample_size: int,
) -> dict[str, Any]:
    """The arguments every twin's shape takes (the encoder and decoder levels)."""
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
    }


# The 16-channel VAEs of FLUX.1 and SD3 / SD3.5: the SD shape with 16 latent channels and no quant convs. Their
# pipelines normalise latents as (z - shift_factor) * scaling_factor, with the released models' constants (their
# diffusers configs, vae/config.json of black-forest-labs/FLUX.1-dev and stabilityai/stable-diffusion-3-medium-diffusers)
# as the initial values here; `load_vae` gives them to a file of such a VAE that comes without a config.
RELEASED_CONSTANTS: dict[str, dict[str, float]] = {
    "FLUX.1": {"scaling_factor": 0.3611, "shift_factor": 0.1159},
    "SD3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},
}
_NO_QUANT_CONVS = {"use_quant_conv": False, "use_post_quant_conv": False}
_FLUX1 = {**RELEASED_CONSTANTS["FLUX.1"], **_NO_QUANT_CONVS}
_SD3 = {**RELEASED_CONSTANTS["SD3"], **_NO_QUANT_CONVS}


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
    # The FLUX.1 VAE (black-forest-labs/FLUX.1-dev, vae/): 34.3 M encoder + 49.5 M decoder parameters (83.8 M).
    "flux1-kl-f8c16": _kl_preset((128, 256, 512, 512), 2, 16, sample_size=1024, **_FLUX1),
    # The SD3 / SD3.5 VAE (stabilityai/stable-diffusion-3-medium-diffusers, vae/): the same shape.
    "sd3-kl-f8c16": _kl_preset((128, 256, 512, 512), 2, 16, sample_size=1024, **_SD3),
    # tiny-kl-f8's size with each family's latent and constants, for the CPU quickstart and tests.
    "tiny-flux1-kl-f8c16": _kl_preset((32, 64, 64, 64), 1, 16, 16, **_FLUX1),
    "tiny-sd3-kl-f8c16": _kl_preset((32, 64, 64, 64), 1, 16, 16, **_SD3),
}

# Constructor arguments for `AutoencoderKLFlux2` (offered by its `from_preset` and `train.py --model flux2`). Its
# config has no scaling or shift factor: FLUX.2 pipelines normalise the 2x2-patchified latents with the running
# statistics of the model's `bn` (BatchNorm2d) buffers.
FLUX2_PRESETS: dict[str, dict[str, Any]] = {
    # The FLUX.2 VAE: diffusers.AutoencoderKLFlux2's defaults (32 latent channels, quant convs, 1024 px), 84.0 M
    # parameters.
    "flux2-kl-f8c32": _body((128, 256, 512, 512), 2, 32, 32, 1024),
    # tiny-kl-f8's size with FLUX.2's latent, for the CPU quickstart and tests.
    "tiny-flux2-kl-f8c32": _body((32, 64, 64, 64), 1, 32, 16, 256),
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
