"""Artefacts a latent diffusion model inherits from its VAE: equivariance error, round-trip drift, tiling seams,
and the generative view (prior samples, latent interpolations).

All take and give uint8-valued float RGB images `(B, 3, H, W)` (the evaluation protocol's, `to_uint8`) and use
the posterior mode (a VQ model: its encoder output, which `decode` quantises).

- Equivariance: PSNR of decode(T(z)) against T(x), T = 2x and 4x area downscaling (average pooling) and a 90-degree
  rotation, applied to the unscaled latent z = E(x) and to the image x. For a VAE that commutes with T the result is
  the reconstruction PSNR of T(x); EQ-VAE-style training works towards that.
- Round-trip drift: x_k = D(E(x_{k-1})) with every x_k clamped and rounded to uint8 (as if saved), PSNR and mean
  CIEDE2000 of x_k against x_0.
- Tiling seams: the same latent decoded whole and tiled (at twice the tile size), PSNR of the tiled decode against
  the whole one on unrounded values in uint8 units, and the worst 8-px band: the 8-row or 8-column strip at any
  offset with the largest difference. Whole and tiled decodes differ only by the tiling, so that strip lies on a
  tile border.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentvae.evaluation.colour import ciede2000
from latentvae.evaluation.evaluate import decode, encode, reconstruct
from latentvae.evaluation.latent_health import denormalise_latents, normalise_latents
from latentvae.evaluation.metrics import psnr, to_uint8

TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "downscale_2x": lambda t: F.avg_pool2d(t, 2),
    "downscale_4x": lambda t: F.avg_pool2d(t, 4),
    "rotate_90": lambda t: torch.rot90(t, 1, (-2, -1)),
}
DRIFT_CYCLES = (1, 2, 4, 8)
SEAM_BAND = 8  # pixels


def _to_model(model: nn.Module, images: Tensor) -> Tensor:
    return images.to(model.device, model.dtype) / 127.5 - 1


@torch.inference_mode()
def equivariance(model: nn.Module, images: Tensor) -> dict[str, list[float]]:
    """Per-image PSNR of decode(T(z)) against T(x) for each of `TRANSFORMS`, and of the plain reconstruction
    (`"none"`); T(x) is rounded to uint8 as any image is."""
    x = _to_model(model, images)
    z = encode(model, x)
    out = {"none": psnr(to_uint8(x), to_uint8(decode(model, z))).tolist()}
    for name, transform in TRANSFORMS.items():
        target, decoded = to_uint8(transform(x)), to_uint8(decode(model, transform(z)))
        out[name] = psnr(target, decoded).tolist()
    return out


@torch.inference_mode()
def round_trip_drift(
    model: nn.Module, images: Tensor, cycles: Sequence[int] = DRIFT_CYCLES
) -> dict[int, dict[str, list[float]]]:
    """cycles k -> per-image `psnr` and `ciede2000` of the k-th round trip against the original."""
    original = images.to(model.device, torch.float32)
    current = original
    out = {}
    for k in range(1, max(cycles) + 1):
        current, _ = reconstruct(model, current)
        if k in cycles:
            out[k] = {
                "psnr": psnr(original, current).tolist(),
                "ciede2000": ciede2000(original, current).tolist(),
            }
    return out


def tile_size(model: nn.Module) -> int | None:
    """The tile side in pixels of a model with tiled decoding (ours, or diffusers'); None without it."""
    if not hasattr(model, "enable_tiling"):
        return None
    return getattr(model, "tile_sample_size", None) or getattr(model, "tile_sample_min_size", None)


def _decode_tiled(model: nn.Module, z: Tensor, tiled: bool) -> Tensor:
    budget = getattr(model, "tile_memory_budget", None)
    if hasattr(model, "tile_memory_budget"):
        model.tile_memory_budget = None  # whole means whole: no tiling triggered by memory
    try:
        model.enable_tiling() if tiled else model.disable_tiling()
        return decode(model, z).float().clamp(-1, 1)
    finally:
        model.disable_tiling()
        if hasattr(model, "tile_memory_budget"):
            model.tile_memory_budget = budget


def worst_band(difference: Tensor, band: int = SEAM_BAND) -> tuple[float, str]:
    """Largest mean squared difference over any `band`-px strip of rows or columns of `(C, H, W)`, and where."""
    squared = difference.double().square()
    worst, where = -1.0, ""
    for axis, name in ((-2, "rows"), (-1, "columns")):
        profile = squared.mean(dim=(0, -1 if axis == -2 else -2))  # one value per row (or column)
        windows = profile.unfold(0, min(band, len(profile)), 1).mean(1)
        value, start = windows.max(0)
        if value.item() > worst:
            worst, where = value.item(), f"{name} {start.item()}-{start.item() + band - 1}"
    return worst, where


@torch.inference_mode()
def tiling_seams(model: nn.Module, images: Tensor) -> dict[str, Any]:
    """Whole against tiled decode of the images' latents (give images of twice `tile_size(model)`).

    Returns:
        per-image `psnr` and `worst_band_psnr` (uint8 units, MAX 255), `worst_band` (where), and `tile_size`.
    """
    size = tile_size(model)
    if size is None:
        raise ValueError(f"a {type(model).__name__} has no tiled decoding")
    z = encode(model, _to_model(model, images))
    whole, tiled = _decode_tiled(model, z, tiled=False), _decode_tiled(model, z, tiled=True)
    difference = (
        tiled - whole
    ) * 127.5  # in uint8 units, not rounded: tiling errors are well below one level
    out: dict[str, Any] = {"tile_size": size, "psnr": [], "worst_band_psnr": [], "worst_band": []}
    for d in difference:
        mse = d.double().square().mean().item()
        band_mse, where = worst_band(d)
        out["psnr"].append(_db(mse))
        out["worst_band_psnr"].append(_db(band_mse))
        out["worst_band"].append(where)
    return out


def _db(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ----- the generative view -----


@torch.inference_mode()
def prior_samples(
    model: nn.Module, latent_shape: Sequence[int], count: int, generator: torch.Generator
) -> Tensor:
    """Decode normalised latents drawn from N(0, I) (what a diffusion model starts from, and the VAE prior when the
    normalisation is right): `count` uint8-valued images."""
    return decode_normalised(model, torch.randn((count, *latent_shape), generator=generator))


@torch.inference_mode()
def decode_normalised(model: nn.Module, z: Tensor) -> Tensor:
    """Normalised latents (what a diffusion model produces) -> uint8-valued images."""
    return to_uint8(decode(model, denormalise_latents(model, z.to(model.device, model.dtype))))


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation of two tensors (as flat vectors); linear where they are (anti)parallel."""
    cos = torch.dot(a.flatten().double(), b.flatten().double()) / (a.double().norm() * b.double().norm())
    omega = torch.arccos(cos.clamp(-1, 1))
    if omega.sin().abs() < 1e-6:
        return (1 - t) * a + t * b
    # sin((1 - t) w) / sin w * a + sin(t w) / sin w * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / omega.sin()


@torch.inference_mode()
def interpolations(model: nn.Module, pair: Tensor, steps: int = 8) -> dict[str, Tensor]:
    """Decodes along the linear and the spherical path between two images' normalised latents (`pair`: 2 images);
    `{"lerp": (steps, 3, H, W), "slerp": ...}` uint8-valued."""
    z = normalise_latents(model, encode(model, _to_model(model, pair)))
    ts = [i / (steps - 1) for i in range(steps)]
    paths = {
        "lerp": torch.stack([(1 - t) * z[0] + t * z[1] for t in ts]),
        "slerp": torch.stack([slerp(z[0], z[1], t) for t in ts]),
    }
    return {
        name: to_uint8(decode(model, denormalise_latents(model, path.to(z.dtype))))
        for name, path in paths.items()
    }
