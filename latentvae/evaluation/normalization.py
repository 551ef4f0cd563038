"""Latent normalisation: the constants a diffusion pipeline normalises a VAE's latents with, computed from measured
`LatentStats` and written where that pipeline reads them.

    mode         pipelines             normalised latent z_n                                  constants (over the set)
    scale        SD 1.x / 2.x / SDXL   z * scaling_factor                                     scaling_factor = 1 / std(z)
    shift_scale  FLUX.1, SD3           (z - shift_factor) * scaling_factor                    shift_factor = mean(z),
                                                                                              scaling_factor = 1 / std(z)
    per_channel  those that read       (z - latents_mean) * scaling_factor / latents_std      latents_mean / latents_std
                 latents_mean / _std   (per channel, as SDXL's pipelines do)                  per channel, scaling_factor 1
    batchnorm    FLUX.2                (patchify(z) - bn.running_mean)                        bn.running_mean / running_var
                                         / sqrt(bn.running_var + batch_norm_eps)              per patchified channel (4C)

Each makes the measured latents' mean 0 (scale: only their std) and std 1 (batchnorm: sqrt(var / (var + eps))). The
config keys of the other conventions are cleared (None), so no pipeline reads a stale constant next to new ones.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import Tensor, nn

from latentvae.evaluation.latent_stats import LatentStats, patchify, unpatchify

logger = logging.getLogger(__name__)

MODES = ("scale", "shift_scale", "per_channel", "batchnorm")
CONFIG_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
BN_KEYS = ("bn.running_mean", "bn.running_var")
# The config keys a mode needs (batchnorm: the model's `bn`).
NEEDED = {
    "scale": ("scaling_factor",),
    "shift_scale": ("scaling_factor", "shift_factor"),
    "per_channel": ("scaling_factor", "latents_mean", "latents_std"),
    "batchnorm": (),
}
PER_CHANNEL_WARNING = (
    "per_channel writes latents_mean / latents_std and sets scaling_factor to 1: pipelines that read them (SDXL's "
    "among them) now normalise per channel, (z - latents_mean) * scaling_factor / latents_std, instead of z * "
    "scaling_factor; pipelines that read only scaling_factor (SD 1.x / 2.x, FLUX.1, SD3) get unit-scaled latents"
)


def has_batchnorm(vae: nn.Module) -> bool:
    """Whether `vae` carries FLUX.2's latent BatchNorm (`AutoencoderKLFlux2`, ours or diffusers')."""
    return isinstance(getattr(vae, "bn", None), nn.BatchNorm2d)


def default_mode(vae: nn.Module) -> str:
    """The latent family's convention: FLUX.2 (a `bn`) -> batchnorm; FLUX.1 / SD3 (a shift_factor, or 16 channels
    without quant convs) -> shift_scale; otherwise (SD, VQ) -> scale."""
    if has_batchnorm(vae):
        return "batchnorm"
    config = vae.config
    if config.get("shift_factor") is not None or (
        config.get("use_quant_conv") is False and config.get("latent_channels") == 16
    ):
        return "shift_scale"
    return "scale"


def check_mode(vae: nn.Module, mode: str) -> None:
    """Raise a ValueError naming what is missing when `vae` cannot hold `mode`'s constants."""
    if mode not in MODES:
        raise ValueError(f"unknown latent normalisation {mode!r}: choose one of {', '.join(MODES)}")
    name = type(vae).__name__
    if mode == "batchnorm" and not has_batchnorm(vae):
        raise ValueError(
            f"batchnorm normalisation sets FLUX.2's bn running statistics; {name} has no bn: use "
            f"{default_mode(vae)}"
        )
    if mode == "batchnorm" and vae.bn.num_features != 4 * vae.config.latent_channels:
        raise ValueError(
            f"FLUX.2 pipelines patchify latents 2x2 before the bn; {name}'s bn has {vae.bn.num_features} channels "
            f"for {vae.config.latent_channels} latent channels (patch_size {vae.config.get('patch_size')}), not "
            "4 per latent channel: batchnorm normalisation needs patch_size (2, 2)"
        )
    missing = [key for key in NEEDED[mode] if key not in vae.config]
    if missing:
        raise ValueError(
            f"{mode} normalisation writes {', '.join(NEEDED[mode])} into the config; {name}'s config has no "
            f"{', '.join(missing)}: use {default_mode(vae)}"
        )


def constants(stats: LatentStats, mode: str) -> dict[str, Any]:
    """The values `mode` writes (config keys, or `bn.running_mean` / `bn.running_var` lists) for `stats`."""
    if mode == "scale":
        return {
            "scaling_factor": stats.scaling_factor,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
    if mode == "shift_scale":  # 1 / std of z - mean: the std around the mean, as for scale
        return {
            "scaling_factor": stats.scaling_factor,
            "shift_factor": stats.mean,
            "latents_mean": None,
            "latents_std": None,
        }
    if mode == "per_channel":
        return {
            "scaling_factor": 1.0,
            "shift_factor": None,
            "latents_mean": list(stats.channel_mean),
            "latents_std": list(stats.channel_std),
        }
    if mode == "batchnorm":
        if stats.patch_mean is None:
            raise ValueError(
                "batchnorm normalisation needs 2x2-patchified latents, so latents of even height and width: measure "
                "on images whose side is a multiple of twice the VAE's downsampling factor (e.g. 256 px)"
            )
        return {"bn.running_mean": list(stats.patch_mean), "bn.running_var": list(stats.patch_var)}
    raise ValueError(f"unknown latent normalisation {mode!r}: choose one of {', '.join(MODES)}")


def suggestions(vae: nn.Module, stats: LatentStats) -> dict[str, dict[str, Any]]:
    """What each convention `vae` can hold would set, measured by `stats` (the keys the model has)."""
    out = {}
    for mode in MODES:
        try:
            check_mode(vae, mode)
            values = constants(stats, mode)
        except ValueError:
            continue
        out[mode] = {k: v for k, v in values.items() if k in BN_KEYS or k in vae.config}
    return out


def held_constants(vae: nn.Module) -> dict[str, Any]:
    """The normalisation constants `vae` holds now: its config's, and its bn statistics when it has a bn."""
    held = {key: vae.config[key] for key in CONFIG_KEYS if key in vae.config}
    if has_batchnorm(vae):
        held["bn.running_mean"] = vae.bn.running_mean.tolist()
        held["bn.running_var"] = vae.bn.running_var.tolist()
    return held


def apply_normalization(vae: nn.Module, mode: str, stats: LatentStats) -> dict[str, Any]:
    """Write `mode`'s constants for `stats` into `vae` (its config; for batchnorm, its bn buffers, set to the exact
    statistics of the measured set rather than a momentum average). Returns what was written."""
    check_mode(vae, mode)
    values = {k: v for k, v in constants(stats, mode).items() if k in BN_KEYS or k in vae.config}
    if mode == "batchnorm":
        with torch.no_grad():
            vae.bn.running_mean.copy_(torch.tensor(values["bn.running_mean"]))
            vae.bn.running_var.copy_(torch.tensor(values["bn.running_var"]))
    else:
        vae.register_to_config(**values)
    if mode == "per_channel":
        logger.warning(PER_CHANNEL_WARNING)
    return values


def report(vae: nn.Module, stats: LatentStats) -> dict[str, Any]:
    """A VAE's normalisation report: what each convention it can hold would set, measured by `stats`
    (`suggestions`), next to what it holds (`held_constants`), which convention that is, and the family's default."""
    return {
        "default_mode": default_mode(vae),
        "held_mode": held_mode(vae),
        "held": held_constants(vae),
        "suggested": suggestions(vae, stats),
    }


def held_mode(vae: nn.Module) -> str:
    """The convention the constants `vae` holds select, as pipelines read them (a bn first, then per-channel
    statistics, then a shift)."""
    config = vae.config
    if has_batchnorm(vae):
        return "batchnorm"
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return "per_channel"
    return "shift_scale" if config.get("shift_factor") is not None else "scale"


def _shift_and_scale(vae: nn.Module, z: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """(m, s) of `mode` for latents like `z`, such that a pipeline's normalised latent is (z - m) / s (batchnorm:
    of the patchified z)."""
    config = vae.config

    def per_channel(values: Any) -> Tensor:
        return torch.as_tensor(values, dtype=z.dtype, device=z.device).view(1, -1, 1, 1)

    if mode == "batchnorm":
        return per_channel(vae.bn.running_mean), torch.sqrt(
            per_channel(vae.bn.running_var) + config.batch_norm_eps
        )
    if mode == "per_channel":
        return per_channel(config.latents_mean), per_channel(config.latents_std) / config.scaling_factor
    shift = config.shift_factor if mode == "shift_scale" else 0.0
    return per_channel([shift]), per_channel([1.0 / config.scaling_factor])


def normalize_latents(vae: nn.Module, z: Tensor, mode: str | None = None) -> Tensor:
    """Unscaled latents (B, C, h, w) -> what a pipeline of `mode` (default: `held_mode`) gives its diffusion model;
    batchnorm: patchified, (B, 4C, h/2, w/2)."""
    mode = mode or held_mode(vae)
    shift, scale = _shift_and_scale(vae, z, mode)
    return ((patchify(z) if mode == "batchnorm" else z) - shift) / scale


def denormalize_latents(vae: nn.Module, z: Tensor, mode: str | None = None) -> Tensor:
    """The inverse of `normalize_latents`: the unscaled latents a pipeline decodes."""
    mode = mode or held_mode(vae)
    shift, scale = _shift_and_scale(vae, z, mode)
    z = z * scale + shift
    return unpatchify(z) if mode == "batchnorm" else z


def short(value: Any) -> str:
    """A constant in a line of text: a number to 5 significant digits, a list as its range and length."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return f"{min(value):.4g}..{max(value):.4g} ({len(value)} values)" if value else "[]"
    return f"{value:.5g}"


def describe(mode: str, values: dict[str, Any], stats: LatentStats) -> str:
    """One line for a summary or a model card: the constants written and how they were measured."""
    latents = {"sample": "posterior samples", "mode": "posterior modes"}.get(
        stats.posterior, stats.posterior + "s"
    )
    written = ", ".join(f"{key} {short(value)}" for key, value in values.items() if value is not None)
    how = {
        "scale": "1 / std",
        "shift_scale": "mean and 1 / std",
        "per_channel": "per-channel mean and std",
        "batchnorm": "exact mean and variance per 2x2-patchified channel",
    }[mode]
    return f"{mode}: {written} ({how} of {latents} over {stats.num_images} images)"


def export_metadata(how: str, stats: LatentStats) -> dict[str, str]:
    """The safetensors metadata strings an export carries about its constants: how they were found (`how`, e.g.
    `describe`'s line and the images) and the per-channel statistics they were computed from."""
    return {
        "latent_normalization": how,
        "latent_channel_mean": json.dumps(stats.channel_mean),
        "latent_channel_std": json.dumps(stats.channel_std),
        "latent_statistics_images": str(stats.num_images),
    }
