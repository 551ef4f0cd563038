"""Colour fidelity, which PSNR hides (luma dominates an RGB MSE): PSNR of luma and of chroma, the colourfulness
ratio, and CIEDE2000. All take uint8-valued RGB batches `(B, 3, H, W)` and return one value per image.

- YCbCr is ITU-R BT.601 at full range (JPEG / JFIF, what PIL's "YCbCr" mode computes):
      Y  =       0.299 R    + 0.587 G    + 0.114 B
      Cb = 128 - 0.168736 R - 0.331264 G + 0.5 B
      Cr = 128 + 0.5 R      - 0.418688 G - 0.081312 B
- Colourfulness (Hasler & Suesstrunk 2003), with rg = R - G and yb = (R + G) / 2 - B over the pixels:
      M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)
  The ratio M(reconstruction) / M(original) is 1 for faithful colour and falls towards 0 as a VAE greys the image
  (a colour cast can also raise it: read it beside chroma PSNR and CIEDE2000). Undefined (NaN) for a grey
  original.
- CIEDE2000: the mean colour difference over pixels in CIELAB (D65), computed by scikit-image.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import deltaE_ciede2000, rgb2lab
from torch import Tensor

from latentvae.evaluation.metrics import psnr

_RGB_TO_YCBCR = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], dtype=torch.float64
)
_YCBCR_OFFSET = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)


def to_ycbcr(images: Tensor) -> Tensor:
    """uint8-valued RGB `(B, 3, H, W)` -> BT.601 full-range YCbCr `(B, 3, H, W)` in float64 (not rounded)."""
    matrix = _RGB_TO_YCBCR.to(images.device)
    return (
        torch.einsum("ij,bjhw->bihw", matrix, images.double())
        + _YCBCR_OFFSET.to(images.device)[:, None, None]
    )


def luma_chroma_psnr(reference: Tensor, reconstruction: Tensor) -> tuple[Tensor, Tensor]:
    """PSNR in dB per image of Y alone and of Cb and Cr together (MAX 255)."""
    a, b = to_ycbcr(reference), to_ycbcr(reconstruction)
    return psnr(a[:, :1], b[:, :1]), psnr(a[:, 1:], b[:, 1:])


def colourfulness(images: Tensor) -> Tensor:
    """Hasler & Suesstrunk's colourfulness M per image (see the module docstring); 0 for a grey image."""
    r, g, b = images.double().flatten(2).unbind(1)  # (B, H*W) each
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False))
    offset = torch.sqrt(rg.mean(1).square() + yb.mean(1).square())
    return (spread + 0.3 * offset).float()


def colourfulness_ratio(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """M(reconstruction) / M(reference) per image; NaN where the reference is grey (M = 0)."""
    original = colourfulness(reference)
    ratio = colourfulness(reconstruction) / original
    return torch.where(original > 0, ratio, torch.full_like(ratio, float("nan")))


def ciede2000(reference: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean CIEDE2000 colour difference per image (0: identical; about 1: just noticeable; 2-10: clearly visible)."""
    values = []
    for real, fake in zip(reference, reconstruction):
        lab = [
            rgb2lab(image.permute(1, 2, 0).cpu().numpy().astype(np.float64) / 255.0) for image in (real, fake)
        ]
        values.append(float(deltaE_ciede2000(*lab).mean()))
    return torch.tensor(values)


def colour_scores(reference: Tensor, reconstruction: Tensor) -> dict[str, Tensor]:
    """All of the above per image: `psnr_y`, `psnr_c`, `colourfulness_ratio`, `ciede2000`."""
    luma, chroma = luma_chroma_psnr(reference, reconstruction)
    return {
        "psnr_y": luma,
        "psnr_c": chroma,
        "colourfulness_ratio": colourfulness_ratio(reference, reconstruction),
        "ciede2000": ciede2000(reference, reconstruction),
    }
