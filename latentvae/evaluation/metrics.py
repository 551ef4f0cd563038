"""Reconstruction metrics by the published protocol: PSNR and SSIM on uint8 RGB per image; rFID over a set."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from latentvae.pretrained import FID_INCEPTION, require_hub_weights


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 values round((x + 1) * 127.5), after clamping (kept as a float tensor)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """PSNR in dB per image on uint8-valued tensors (B, C, H, W): 10 log10(255^2 / MSE); identical images give inf."""
    mse = (reference.double() - reconstruction.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(255.0**2 / mse)).float()


def ssim(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """SSIM per image on uint8-valued RGB (B, 3, H, W), averaged over channels.

    The literature's settings (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range
    255; computed by torchmetrics (a kept library). torchmetrics reflect-pads the borders by the window radius and
    averages the whole SSIM map, where scikit-image averages only the interior: the two agree in the interior and
    differ by a few thousandths on a 128 px image (less on larger ones).
    """
    return structural_similarity_index_measure(
        reconstruction.double(),
        reference.double(),
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=255.0,
        k1=0.01,
        k2=0.03,
        reduction="none",
    ).float()


def build_fid_inception(*, offline: bool = False, alternative: str = "evaluate with --no_fid") -> nn.Module:
    """pytorch-fid's InceptionV3 with the standard FID weights, returning the 2048-d pool3 features.

    The weights file (`FID_INCEPTION.filename`) is read by pytorch-fid itself from the torch hub cache
    (`$TORCH_HOME/hub/checkpoints/`); we put it there first when it is missing (`require_hub_weights`: a short
    timeout, and offline an error that names the file).

    Args:
        offline (`bool`): never download a missing file (as `$HF_HUB_OFFLINE=1` does).
        alternative (`str`): what the user can do instead, quoted in the error.

    Returns:
        `nn.Module`: in eval mode, frozen; feed it to `inception_features`.

    Raises:
        `MissingWeightsError`: the weights file is missing, and we are offline or the download failed.
    """
    # Imported here: pytorch-fid pulls in scipy, which training never needs.
    from pytorch_fid.inception import InceptionV3

    require_hub_weights(FID_INCEPTION, alternative=alternative, offline=offline)
    network = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    return network.eval().requires_grad_(False)


@torch.no_grad()
def inception_features(network: nn.Module, images: Tensor) -> Tensor:
    """Pool3 features `(B, 2048)` in float64 of uint8-valued RGB images `(B, 3, H, W)` of any size.

    pytorch-fid's network takes [0, 1] and resizes to 299x299 (bilinear) itself, as its own FID does.
    """
    device = next(network.parameters()).device
    return network(images.to(device, torch.float32) / 255.0)[0].flatten(1).double().cpu()


def frechet_distance(features_a: Tensor | np.ndarray, features_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets `(N, D)` (FID when the features are Inception
    pool3 features): ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with unbiased covariances S.

    The matrix square root and its numerical safeguards are pytorch-fid's `calculate_frechet_distance`.

    Raises:
        `ValueError`: fewer than two samples in a set (no covariance), or pytorch-fid finds a large imaginary
            component in the square root (numerically degenerate covariances).
    """
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if min(len(a), len(b)) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b))
