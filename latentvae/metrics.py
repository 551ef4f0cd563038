"""Reconstruction metrics by the published protocol: PSNR and SSIM on uint8 RGB, per image."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


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
    255; computed by torchmetrics (a kept library), which evaluates the valid region of the window.
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
