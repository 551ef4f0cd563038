"""Colour scores (`latentvae.evaluation.colour`) against PIL's YCbCr, analytic values and scikit-image, and the
validation grid of whole, colourful images that training draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import deltaE_ciede2000, rgb2lab

from latentvae.evaluation.colour import (
    ciede2000,
    colourfulness,
    colourfulness_ratio,
    luma_chroma_psnr,
    to_ycbcr,
)
from latentvae.training.validation import grid_images, reconstruction_grid


def photo(seed: int = 0, size: tuple[int, int] = (40, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    smooth = np.stack([np.sin(xx / 5), np.cos(yy / 7), np.sin((xx + yy) / 9)], axis=-1)
    return (127.5 + 100 * smooth + rng.normal(0, 10, smooth.shape)).clip(0, 255).astype(np.uint8)


def batch(*arrays: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


def test_ycbcr_is_pils_bt601_full_range():
    image = photo()
    ours = to_ycbcr(batch(image))[0].permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(image).convert("YCbCr"), dtype=np.float64)
    assert np.abs(ours - pil).max() <= 1.0  # PIL rounds to integers (in fixed point)


def test_a_greyed_image_keeps_its_luma_and_loses_its_chroma():
    image = photo()
    grey = np.asarray(Image.fromarray(image).convert("L").convert("RGB"))  # Y kept, Cb = Cr = 128
    luma, chroma = luma_chroma_psnr(batch(image), batch(grey))
    assert luma.item() > 45 and chroma.item() < 30
    assert colourfulness_ratio(batch(image), batch(grey)).item() == pytest.approx(0.0, abs=1e-3)
    assert colourfulness_ratio(batch(image), batch(image)).item() == pytest.approx(1.0)


def test_colourfulness_analytic_values():
    uniform = np.zeros((8, 8, 3), np.uint8) + np.array([200, 50, 50], np.uint8)
    # no spread; rg = 150, yb = (200 + 50) / 2 - 50 = 75: M = 0.3 * sqrt(150^2 + 75^2)
    assert colourfulness(batch(uniform)).item() == pytest.approx(0.3 * math.hypot(150, 75), rel=1e-6)
    halves = np.zeros((8, 8, 3), np.uint8)
    halves[:, 4:, 0] = 100  # R = 0 or 100: rg and yb = R / 2 each have std 50 and 25, means 50 and 25
    expected = math.hypot(50, 25) + 0.3 * math.hypot(50, 25)
    assert colourfulness(batch(halves)).item() == pytest.approx(expected, rel=1e-6)
    grey = np.full((8, 8, 3), 90, np.uint8)
    assert colourfulness(batch(grey)).item() == 0
    assert math.isnan(
        colourfulness_ratio(batch(grey), batch(uniform)).item()
    )  # undefined for a grey original


def test_ciede2000_is_the_mean_of_scikit_images_per_pixel_difference():
    a, b = photo(0), photo(1)
    expected = deltaE_ciede2000(rgb2lab(a / 255.0), rgb2lab(b / 255.0)).mean()
    values = ciede2000(batch(a, a), batch(b, a))
    assert values[0].item() == pytest.approx(expected, rel=1e-6) and values[1].item() == 0


def test_the_validation_grid_shows_the_most_colourful_images_whole(tmp_path):
    dull = np.full((60, 90, 3), 120, np.uint8)
    dull[:, :45] = 110
    vivid = np.zeros((300, 200, 3), np.uint8)
    vivid[:150, :, 0], vivid[150:, :, 2] = 255, 255  # red above blue
    paths = []
    for name, pixels in (("dull", dull), ("vivid", vivid), ("photo", photo(size=(64, 48)))):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(pixels).save(paths[-1])
    images = grid_images(paths, count=2, size=256, multiple=8)
    assert len(images) == 2
    first = images[0]
    # the vivid one first, whole: 300 x 200 scaled to fit 256 -> 256 x 170, sides cut to multiples of 8
    assert tuple(first.shape) == (3, 256, 168)
    assert first[0, :100].mean() > 0.9 and first[2, -100:].mean() > 0.9  # red on top, blue below: not a crop
    assert tuple(images[1].shape) == (3, 48, 64)  # smaller than 256: kept at its size

    class Identity(torch.nn.Module):
        device, dtype = torch.device("cpu"), torch.float32

        def forward(self, x):
            return type("Out", (), {"sample": x})()

    grid = reconstruction_grid(Identity(), images, size=256)
    assert tuple(grid.shape) == (3, 2 * 256 + 3 * 4, 3 * 256 + 4 * 4)  # 2 rows of input | recon | error
